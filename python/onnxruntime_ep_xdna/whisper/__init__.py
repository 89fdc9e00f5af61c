"""Whisper on ONNX Runtime: model acquisition (model.py), CTranslate2 conversion (ct2.py, convert.py),
transcription (transcribe.py, audio.py, formats.py)."""

from .model import ModelFetchError, ensure_model, fetch_speech_samples, make_tiny_random_whisper

__all__ = ["ModelFetchError", "ensure_model", "fetch_speech_samples", "make_tiny_random_whisper"]
