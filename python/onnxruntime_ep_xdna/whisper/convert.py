"""Assemble a transformers Whisper directory offline: weights, config, generation config, processor files.

No hub access exists where this runs, so every file `WhisperProcessor.from_pretrained` and `generate()` need
is built here from what the registry packages ship (a HF ``tokenizer.json`` and CTranslate2's ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .ct2 import CT2FormatError, WhisperDims
from .features import CHUNK_LENGTH, HOP_LENGTH, N_FFT, N_TIMESTAMPS, SAMPLE_RATE, TIME_PRECISION
from .options import TranscriptionOptions

# transformers' generate() reads the decoding default (max_initial_timestamp 1.0 s) as a timestamp index.
MAX_INITIAL_TIMESTAMP_INDEX = round(TranscriptionOptions.max_initial_timestamp / TIME_PRECISION)

# Files transformers/optimum need besides the weights; copied over the optimum export afterwards.
PROCESSOR_AND_CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
)


@dataclasses.dataclass
class SpecialTokens:
    """Ids of Whisper's control tokens for one vocabulary (they differ between .en and multilingual)."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    start_of_lm: int
    start_of_prev: int
    no_speech: int
    no_timestamps: int
    languages: dict[str, int]  # "<|en|>" -> id; empty for English-only models

    @classmethod
    def from_vocab(cls, token_to_id: dict[str, int], multilingual: bool) -> "SpecialTokens":
        def tid(token: str) -> int:
            if token not in token_to_id:
                raise CT2FormatError(f"tokenizer lacks Whisper control token {token}")
            return token_to_id[token]

        sot, translate = tid("<|startoftranscript|>"), tid("<|translate|>")
        languages = {}
        if multilingual:
            id_to_token = {i: t for t, i in token_to_id.items()}
            languages = {id_to_token[i]: i for i in range(sot + 1, translate)}
        no_speech = token_to_id.get("<|nospeech|>", token_to_id.get("<|nocaptions|>"))
        if no_speech is None:
            raise CT2FormatError("tokenizer lacks <|nocaptions|>/<|nospeech|>")
        return cls(
            eot=tid("<|endoftext|>"), sot=sot, translate=translate, transcribe=tid("<|transcribe|>"),
            start_of_lm=tid("<|startoflm|>"), start_of_prev=tid("<|startofprev|>"), no_speech=no_speech,
            no_timestamps=tid("<|notimestamps|>"), languages=languages,
        )


def timestamp_tokens() -> list[str]:
    return ["<|%.2f|>" % (i * TIME_PRECISION) for i in range(N_TIMESTAMPS)]


def write_tokenizer(tokenizer_json: Path, out_dir: Path, *, multilingual: bool) -> SpecialTokens:
    """Save fast + slow Whisper tokenizer files from a HF ``tokenizer.json``; add timestamp tokens if missing.

    Older tiny.en tokenizer.json files stop at <|notimestamps|>; the timestamp tokens must follow it directly
    (ids no_timestamps+1 ...) because generate() and the tokenizer locate timestamps by that offset.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise CT2FormatError(f"{tokenizer_json} is not a byte-level BPE tokenizer.json")
    # Slow-tokenizer files (vocab.json + merges.txt) so WhisperTokenizer (slow) loads too.
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    added = sorted(spec.get("added_tokens", []), key=lambda t: t["id"])
    specials = [t["content"] for t in added if t.get("special")]
    # <|notimestamps|> must be the last special id: WhisperTokenizer puts timestamps at all_special_ids[-1] + 1.
    tokenizer = WhisperTokenizerFast(
        vocab_file=str(vocab_file), merges_file=str(merges_file), tokenizer_file=str(tokenizer_json),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=specials, model_max_length=1024,
    )
    vocab = tokenizer.get_vocab()
    tokens = SpecialTokens.from_vocab(vocab, multilingual)
    if "<|0.00|>" not in vocab:
        if len(tokenizer) != tokens.no_timestamps + 1:
            raise CT2FormatError("tokenizer has tokens after <|notimestamps|> but no timestamp tokens")
        tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=True, special=False)
                              for t in timestamp_tokens()])
    elif tokenizer.convert_tokens_to_ids("<|0.00|>") != tokens.no_timestamps + 1:
        raise CT2FormatError("timestamp tokens do not directly follow <|notimestamps|>")
    tokenizer.save_pretrained(str(out_dir))
    return tokens


def write_feature_extractor(out_dir: Path, num_mel_bins: int) -> None:
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=CHUNK_LENGTH,
        n_fft=N_FFT, padding_value=0.0, return_attention_mask=False,
    ).save_pretrained(str(out_dir))


def generation_settings(tokens: SpecialTokens, *, max_length: int, suppress_tokens: list[int],
                        begin_suppress_tokens: list[int], alignment_heads: list[list[int]]) -> dict:
    """The Whisper fields transformers' generate() reads (language/task prompts, timestamps, suppression)."""
    multilingual = bool(tokens.languages)
    settings = {
        "alignment_heads": alignment_heads,
        "begin_suppress_tokens": begin_suppress_tokens,
        "bos_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        # generate() builds the prompt from language/task/return_timestamps; a fixed prompt would override that.
        "forced_decoder_ids": None,
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "max_length": max_length,
        "no_timestamps_token_id": tokens.no_timestamps,
        "prev_sot_token_id": tokens.start_of_prev,
        "return_timestamps": False,
        "suppress_tokens": suppress_tokens,
    }
    if multilingual:
        settings["lang_to_id"] = dict(tokens.languages)
        settings["task_to_id"] = {"translate": tokens.translate, "transcribe": tokens.transcribe}
    return settings


def make_configs(dims: WhisperDims, tokens: SpecialTokens, *, suppress_tokens: list[int],
                 begin_suppress_tokens: list[int], alignment_heads: list[list[int]]):
    """(WhisperConfig, GenerationConfig). Assign the latter to model.generation_config before save_pretrained:
    save_pretrained writes generation_config.json from the model, replacing any file written earlier."""
    from transformers import GenerationConfig, WhisperConfig

    # Generation fields stay None in config.json (transformers' convention: the generation config owns them).
    config = WhisperConfig(
        **dataclasses.asdict(dims),
        pad_token_id=tokens.eot, bos_token_id=tokens.eot, eos_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot, suppress_tokens=None, begin_suppress_tokens=None,
        use_cache=True, architectures=["WhisperForConditionalGeneration"],
    )
    settings = generation_settings(tokens, max_length=dims.max_target_positions, suppress_tokens=suppress_tokens,
                                   begin_suppress_tokens=begin_suppress_tokens, alignment_heads=alignment_heads)
    # _from_model_config=False: otherwise generate() regenerates a config from config.json and drops these fields.
    return config, GenerationConfig(**settings, _from_model_config=False)


def build_transformers_dir(ct2_dir: Path, out_dir: Path):
    """CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json) -> transformers directory.

    Returns the loaded WhisperForConditionalGeneration (fp32, eval mode) so callers can verify it.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    from .ct2 import read_ct2_model, to_transformers_state_dict, whisper_dims

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ct2_model = read_ct2_model(ct2_dir / "model.bin")
    dims = whisper_dims(ct2_model)
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    multilingual = dims.vocab_size >= 51865  # openai/whisper: multilingual vocabularies are 51865+ tokens
    tokens = write_tokenizer(ct2_dir / "tokenizer.json", out_dir, multilingual=multilingual)
    if multilingual and sorted(tokens.languages.values()) != sorted(ct2_config.get("lang_ids", [])):
        raise CT2FormatError("language tokens in tokenizer.json disagree with CTranslate2's lang_ids")
    config, generation_config = make_configs(
        dims, tokens,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config["alignment_heads"]],
    )
    write_feature_extractor(out_dir, dims.num_mel_bins)

    state = {k: torch.from_numpy(v) for k, v in to_transformers_state_dict(ct2_model).items()}
    del ct2_model
    model = WhisperForConditionalGeneration(config)
    model.generation_config = generation_config
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"proj_out.weight"}:
        raise CT2FormatError(f"weights do not fit WhisperForConditionalGeneration: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def write_byte_level_tokenizer(out_dir: Path, *, multilingual: bool) -> SpecialTokens:
    """A self-contained Whisper-shaped tokenizer: 256 byte tokens, no merges, then Whisper's control tokens in
    openai's order (languages only when multilingual) and the 1501 timestamp tokens. Lets tests build a
    tiny model with no downloads while keeping every id relation generate() relies on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(byte_tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    if multilingual:
        specials += [f"<|{code}|>" for code in LANGUAGES]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                 "<|notimestamps|>"]
    tok.add_special_tokens(specials)
    tok_file = out_dir / "_bytes_tokenizer.json"
    tok.save(str(tok_file))
    try:
        return write_tokenizer(tok_file, out_dir, multilingual=multilingual)
    finally:
        tok_file.unlink()


def build_tiny_random_transformers_dir(out_dir: Path, *, seed: int, multilingual: bool):
    """A tiny random-weight Whisper (d_model 64, 2+2 layers, 4 heads) with the byte-level tokenizer."""
    import torch
    from transformers import WhisperForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = write_byte_level_tokenizer(out_dir, multilingual=multilingual)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(out_dir)))
    dims = WhisperDims(vocab_size=vocab_size, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448)
    config, generation_config = make_configs(dims, tokens, suppress_tokens=[], begin_suppress_tokens=[tokens.eot],
                                             alignment_heads=[[1, 0]])
    write_feature_extractor(out_dir, dims.num_mel_bins)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = generation_config
    # Random weights around N(0, 0.02) leave logits nearly flat; a larger spread makes greedy decoding pick
    # distinct tokens, so ORT-vs-PyTorch comparisons in tests exercise real argmax decisions.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # fixed order -> deterministic
            if name.endswith("weight") and p.dim() >= 2 and "embed_positions" not in name:
                p.normal_(0.0, 0.2, generator=generator)
        # Random logits would mostly pick the 1.5k timestamp tokens and decode to "". Shrinking every embedding
        # row except printable ASCII (ids 0..93 in the byte-level order) makes greedy output visible text.
        model.model.decoder.embed_tokens.weight[94:] *= 0.25
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model

