"""Face analysis: insightface's real detector and recogniser code on synthetic antelopev2 files, the
largest-face rule, the keypoint image, and the stand-in the pipeline tests use."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from modal_services.errors import ErrorCode, ToolboxError
from modal_services.engines.sdxl.faces import (
    FACE_DETECTOR_FILE,
    InsightFaceAnalyser,
    draw_keypoints,
    face_provider,
    keypoints_on_canvas,
    read_face,
)
from tests.fixtures.tiny_faces import STAND_IN_KPS, StandInFaceAnalyser, face_picture, write_synthetic_antelopev2


@pytest.fixture(scope="module")
def antelopev2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "antelopev2"
    projection = write_synthetic_antelopev2(folder)
    return folder, projection


def picture(colour, size=1280) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_the_real_analyser_decodes_boxes_and_keypoints_into_the_photos_pixels(antelopev2):
    folder, _ = antelopev2
    analyser = InsightFaceAnalyser(folder)
    reading = read_face(analyser, picture((200, 180, 170)), "the face image")
    assert reading.count == 2
    # The big face: anchor (10, 10) at stride 32 is (320, 320) in the 640² frame, 3 strides each way;
    # a 1280² photo is letterboxed at half size, so everything doubles.
    np.testing.assert_allclose(reading.face.bbox, [448, 448, 832, 832], atol=1e-3)
    expected_kps = 640 + (STAND_IN_KPS - 0.5) * 2 * 96 * 2
    np.testing.assert_allclose(reading.face.kps, expected_kps, atol=1e-3)
    assert reading.face.embedding.shape == (512,) and reading.face.embedding.dtype == np.float32


def test_the_embedding_is_of_the_aligned_face_in_rgb(antelopev2):
    folder, projection = antelopev2
    # A pure red photo: the aligned 112² crop averages to (1, -1, -1) after ArcFace's normalisation,
    # in RGB order only if the photo reached insightface as BGR.
    face = read_face(InsightFaceAnalyser(folder), picture((255, 0, 0)), "the face image").face
    np.testing.assert_allclose(face.embedding, np.array([1.0, -1.0, -1.0], np.float32) @ projection, rtol=1e-4, atol=1e-4)


def test_no_face_is_a_clear_invalid_input(antelopev2):
    folder, _ = antelopev2
    with pytest.raises(ToolboxError) as error:
        read_face(InsightFaceAnalyser(folder), picture((0, 0, 0)), "the face image")
    assert error.value.code is ErrorCode.INVALID_INPUT and "No face was found in the face image" in error.value.message


def test_missing_files_are_models_missing_before_anything_loads(tmp_path):
    analyser = InsightFaceAnalyser(tmp_path / "antelopev2")
    with pytest.raises(ToolboxError) as error:
        analyser.detect(picture((255, 255, 255), 64))
    assert error.value.code is ErrorCode.MODELS_MISSING and FACE_DETECTOR_FILE in error.value.message


def test_a_file_that_is_no_model_is_a_load_failure(tmp_path):
    folder = tmp_path / "antelopev2"
    write_synthetic_antelopev2(folder)
    (folder / FACE_DETECTOR_FILE).write_bytes(b"not onnx")
    with pytest.raises(ToolboxError) as error:
        InsightFaceAnalyser(folder).detect(picture((255, 255, 255), 64))
    assert error.value.code is ErrorCode.MODEL_LOAD_FAILED and "not onnx" not in error.value.message


def test_a_worker_without_insightface_says_which_extra_to_install(antelopev2, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "insightface.app", None)  # as if the `faces` extra were not installed
    folder, _ = antelopev2
    with pytest.raises(ToolboxError) as error:
        InsightFaceAnalyser(folder).detect(picture((255, 255, 255), 64))
    assert error.value.code is ErrorCode.MODEL_LOAD_FAILED and "faces" in error.value.message


def test_the_provider_is_a_deploy_setting(monkeypatch):
    assert face_provider() == "cpu"
    monkeypatch.setenv("TOOLBOX_FACE_PROVIDER", "CUDA")
    assert face_provider() == "cuda"
    monkeypatch.setenv("TOOLBOX_FACE_PROVIDER", "tpu")
    with pytest.raises(ToolboxError) as error:
        face_provider()
    assert error.value.code is ErrorCode.INVALID_INPUT


def test_keypoints_follow_the_photo_when_it_is_scaled_to_cover_the_output():
    analyser = StandInFaceAnalyser()
    photo = Image.open(io.BytesIO(face_picture(size=(200, 100), boxes=((50, 0, 150, 100),))))
    reading = read_face(analyser, photo, "the face image")
    # 200×100 covering 512×512: scaled 5.12 times to 1024×512, then 256 cut from each side.
    kps = keypoints_on_canvas(reading, 512, 512)
    np.testing.assert_allclose(kps, reading.face.kps * 5.12 - [256, 0], atol=1e-4)


def test_the_keypoint_image_is_instantids_drawing():
    kps = np.array([[40, 40], [88, 40], [64, 64], [44, 90], [84, 90]], dtype=np.float64)
    image = np.asarray(draw_keypoints(kps, 128, 96))
    assert image.shape == (96, 128, 3)
    # Each point a disc of its own colour; the limbs in 60 % of their start point's colour.
    assert tuple(image[40, 40]) == (255, 0, 0) and tuple(image[64, 64]) == (0, 0, 255)
    assert tuple(image[90, 84]) == (255, 0, 255)
    assert tuple(image[52, 52]) == (153, 0, 0)  # halfway from the left eye to the nose
    assert tuple(image[5, 120]) == (0, 0, 0)


def test_the_stand_in_reads_the_largest_of_many_faces_deterministically():
    analyser = StandInFaceAnalyser()
    two = Image.open(io.BytesIO(face_picture(boxes=((10, 10, 50, 50), (100, 60, 220, 200)))))
    reading = read_face(analyser, two, "the face image")
    assert reading.count == 2 and list(reading.face.bbox) == [100, 60, 220, 200]
    again = read_face(analyser, two, "the face image").face.embedding
    np.testing.assert_array_equal(reading.face.embedding, again)
    other = Image.open(io.BytesIO(face_picture(boxes=((10, 10, 50, 50), (100, 60, 220, 200)), mark=6)))
    assert not np.allclose(read_face(analyser, other, "x").face.embedding, again)
