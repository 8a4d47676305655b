"""What the front ends say about a finished job beside its images."""

from __future__ import annotations


def job_notes(result: dict) -> list[str]:
    """What a reply says beside a generate job's images: about its face photos, then about how the model read
    the prompt (the engine's `notes`: what Flux removed, where a prompt was cut)."""
    return face_notes(result.get("face")) + list(result.get("notes") or [])


def face_notes(face: dict | None) -> list[str]:
    """What a reply says about a face generation's photos: which face was used when there were several."""
    if not face:
        return []
    notes = []
    if face["faces_found"] > 1:
        notes.append(f"{face['faces_found']} faces in the face photo: the largest one was used.")
    if (face.get("pose_faces_found") or 0) > 1:
        notes.append(f"{face['pose_faces_found']} faces in the pose photo: the largest one set the pose.")
    return notes
