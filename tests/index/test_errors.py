"""Service errors keep their message and type across pickling (how they cross Ray processes)."""

from __future__ import annotations

import pickle

import pytest

from index import errors


@pytest.mark.parametrize(
    "err, status, http, text",
    [
        (errors.InvalidParameter("top_k: too big"), "INVALID_PARAMETER", 400, "top_k: too big"),
        (errors.ModeNotSupported("no text here"), "MODE_NOT_SUPPORTED", 400, "no text here"),
        (errors.LibraryNotFound("shop"), "LIBRARY_NOT_FOUND", 404, "library 'shop' does not exist"),
        (errors.ImageNotFound("shop", "i1"), "IMAGE_NOT_FOUND", 404, "'i1' is not in library 'shop'"),
        (errors.ImageNotFound("shop", "i1", "u"), "IMAGE_NOT_FOUND", 404, "image_id 'i1' with image_uri 'u'"),
        (errors.TaskNotFound("t1"), "TASK_NOT_FOUND", 404, "task 't1' does not exist"),
        (errors.LibraryAlreadyExists("shop"), "LIBRARY_ALREADY_EXISTS", 409, "library 'shop' already exists"),
        (errors.LibraryLimitReached(3), "INVALID_PARAMETER", 400, "maximum of 3 libraries"),
        (errors.ModelMismatch("shop", "a/b", "c/d"), "MODEL_MISMATCH", 409, "built with model 'a/b'"),
        (errors.PayloadTooLarge("image_base64: big"), "PAYLOAD_TOO_LARGE", 413, "image_base64: big"),
        (errors.Overloaded("busy"), "OVERLOADED", 503, "busy"),
    ],
)
def test_status_message_and_pickling(err, status, http, text):
    assert (err.status, err.http_status) == (status, http)
    assert text in err.message and str(err) == err.message
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and back.message == err.message
