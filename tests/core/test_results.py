"""What the front ends say about a finished job beside its images."""

from __future__ import annotations

from bot.core.results import face_notes, job_notes


def test_face_notes_say_which_face_was_used_only_when_there_were_several():
    assert face_notes(None) == [] and face_notes({}) == []
    assert face_notes({"faces_found": 1, "pose_faces_found": None}) == []
    assert face_notes({"faces_found": 3, "pose_faces_found": 2}) == [
        "3 faces in the face photo: the largest one was used.",
        "2 faces in the pose photo: the largest one set the pose.",
    ]


def test_job_notes_add_how_the_prompt_was_read_after_the_faces():
    assert job_notes({"images": []}) == []
    assert job_notes({"face": {"faces_found": 2, "pose_faces_found": None}, "notes": ["Flux does not use weights."]}) == [
        "2 faces in the face photo: the largest one was used.", "Flux does not use weights."]
