"""Whisper on ONNX Runtime.

    features.py    constants, mel filter bank, whole-file log-mel (OpenAI's numbers)
    options.py     TranscriptionOptions (the references' defaults)
    rules.py       special tokens, prompt, suppression, timestamp rules
    search.py      greedy / best-of sampling / batched beam search of one window, temperature fallback
    onnx_model.py  the ONNX Runtime sessions (encoder, decoder, decoder-with-past) driven for batched decoding
    transcribe.py  the long-form seek loop: transcribe(audio, options) -> (segments iterator, info)
    cli.py         `xdna transcribe`;  formats.py  txt/srt/vtt/tsv/json writers;  audio.py  file decoding
    model.py       model fetching, conversion (ct2.py, convert.py), export and verification
    evaluation.py  real speech with transcripts, WER (tests and benchmarks)
"""

from .model import ModelFetchError, ensure_ct2_model, ensure_model, make_tiny_random_whisper
from .onnx_model import TranscribeError, WhisperOnnx, load_model
from .options import OptionsError, TranscriptionOptions
from .transcribe import Result, Segment, TranscriptionInfo, WhisperModel, transcribe, transcribe_all

__all__ = ["ModelFetchError", "OptionsError", "Result", "Segment", "TranscribeError", "TranscriptionInfo",
           "TranscriptionOptions", "WhisperModel", "WhisperOnnx", "ensure_ct2_model", "ensure_model", "load_model",
           "make_tiny_random_whisper", "transcribe", "transcribe_all"]
