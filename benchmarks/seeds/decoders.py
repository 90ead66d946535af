"""Generative seed checkpoints (decoders and T5), built locally with no hub access.

Each seed is a real architecture with seeded random weights, saved with ``save_pretrained`` next to a
tokenizer trained here with the ``tokenizers`` package, so the directory looks like a downloaded
checkpoint (config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

==================  ==========================================  ===============================================
seed                architecture                                size
==================  ==========================================  ===============================================
``gpt-neo-125m``    GPT-Neo (EleutherAI/gpt-neo-125m's config)  real: 12 layers, hidden 768, vocab 50257, 125M
``gpt-j-small``     GPT-J, scaled down                          4 layers, hidden 256, rotary dim 32
``phi-small``       Phi (Phi-2's architecture), scaled down     4 layers, hidden 256, rotary dim 32
``llama-small``     Llama (Orca 2's architecture), scaled down  4 layers, hidden 256, untied lm_head
``t5-small``        T5 (``T5Config()``)                         real: 6+6 layers, d_model 512, vocab 32128, 60.5M
==================  ==========================================  ===============================================

The tokenizer's vocabulary is filled up to the model's vocabulary size (merged pieces the trainer did
not reach are appended), so every id a random model can produce decodes to some text: a random model
emits arbitrary ids, and an id the tokenizer does not know would decode to nothing and hide bugs in
the device's incremental decoding. The corpus mixes ASCII with accented letters, Greek, CJK and emoji,
so many pieces are parts of multi-byte characters.

Needs the ``convert`` extra; heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DECODER_FAMILIES = ("gpt-neo-125m", "gpt-j-small", "phi-small", "llama-small", "t5-small")


@dataclass(frozen=True)
class _Family:
    """How one seed is built: its config, its tokenizer flavour and its special tokens."""

    config: Callable[[int], Any]
    vocab_size: int
    #: "bpe" (byte-level BPE, GPT-2 style) or "unigram" (SentencePiece style, T5)
    tokenizer: str
    special_tokens: tuple[str, ...]
    #: tokenizer_config.json ``tokenizer_class`` (what the real checkpoint declares)
    tokenizer_class: str
    #: add the BOS token in front of every encoded prompt (Llama)
    add_bos: bool = False


def _gpt_neo(vocab: int) -> Any:
    from transformers import GPTNeoConfig

    # GPTNeoConfig()'s defaults are the 1.3B model; these are EleutherAI/gpt-neo-125m's values
    # (bos = eos = the last id, like the real checkpoint).
    return GPTNeoConfig(
        vocab_size=vocab,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        attention_types=[[["global", "local"], 6]],
        max_position_embeddings=2048,
        window_size=256,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )


def _gpt_j(vocab: int) -> Any:
    from transformers import GPTJConfig

    # GPT-J 6B is 28 layers, 4096 wide, 16 heads, rotary dim 64 of head dim 256; this keeps the ratios.
    return GPTJConfig(
        vocab_size=vocab,
        n_positions=2048,
        n_embd=256,
        n_layer=4,
        n_head=4,
        rotary_dim=32,
        n_inner=1024,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        tie_word_embeddings=False,
    )


def _phi(vocab: int) -> Any:
    from transformers import PhiConfig

    # Phi-2: 32 layers, 2560 wide, 32 heads of 80, partial rotary 0.4 (rotary dim 32). Here heads of 64
    # and factor 0.5 keep the rotary dim at 32: the builder's rotary kernels want a multiple of 8.
    # transformers 5 files partial_rotary_factor under rope_parameters; the keyword still sets it.
    rotary: dict[str, Any] = {"partial_rotary_factor": 0.5}
    return PhiConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        tie_word_embeddings=False,
        **rotary,
    )


def _llama(vocab: int) -> Any:
    from transformers import LlamaConfig

    # Orca 2 is a Llama-2 13B fine-tune: RMSNorm, SwiGLU, rotary, untied lm_head, <unk>=0 <s>=1 </s>=2.
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _t5(vocab: int) -> Any:
    from transformers import T5Config

    # T5Config() is t5-small: pad=0 (also the decoder start), eos=1, unk=2.
    special: dict[str, Any] = {"decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}
    return T5Config(vocab_size=vocab, **special)


_ENDOFTEXT = ("<|endoftext|>",)
FAMILIES: dict[str, _Family] = {
    "gpt-neo-125m": _Family(_gpt_neo, 50257, "bpe", _ENDOFTEXT, "GPT2Tokenizer"),
    "gpt-j-small": _Family(_gpt_j, 8192, "bpe", _ENDOFTEXT, "GPT2Tokenizer"),
    "phi-small": _Family(_phi, 8192, "bpe", _ENDOFTEXT, "CodeGenTokenizer"),
    "llama-small": _Family(_llama, 8192, "bpe", ("<unk>", "<s>", "</s>"), "LlamaTokenizer", add_bos=True),
    "t5-small": _Family(_t5, 32128, "unigram", ("<pad>", "</s>", "<unk>"), "T5Tokenizer"),
}

# Text material: English-like words, accented and non-Latin words and emoji (multi-byte UTF-8).
_WORD_TEXT = """
the a this that every some my our their device sensor gateway fleet model update rollout battery
engine pump valve motor door window temperature pressure humidity vibration voltage current signal
network message reading value alarm camera light switch meter controller agent service server edge
factory station truck train road bridge river city farm morning evening night day week hour season
is was are will can should has had runs ran works fails starts stops reports sends receives measures
good bad fast slow hot cold new old small large stable noisy clean broken healthy very often never
and but or because when after before until if then in on at by for with from into over under near
"""
_FOREIGN_TEXT = """
café naïve façade über straße crème brûlée señor niño smörgåsbord ångström
αβγ λόγος δεδομένα μοντέλο θερμοκρασία 温度 传感器 模型 更新 设备 網路 データ モデル 센서 업데이트
привет данные модель датчик 🙂 🚀 🔥 ✓ → ∑ € £ ¥ ½ °C µs
"""
_SYLLABLE_TEXT = "ka ri to me sa lo ve ni pu da gre stan pol mer tek vor lin quo zen bar ül ñe çi"
_WORDS = _WORD_TEXT.split()
_FOREIGN = _FOREIGN_TEXT.split()
_SYLLABLES = _SYLLABLE_TEXT.split()


def generate_corpus(n_sentences: int = 8000, seed: int = 0) -> list[str]:
    """Deterministic sentences mixing English-like words, made-up words, numbers, non-ASCII words and emoji."""
    rng = random.Random(seed)
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(600)]
    sentences = []
    for _ in range(n_sentences):
        words = []
        for _ in range(rng.randint(3, 24)):
            r = rng.random()
            if r < 0.7:
                words.append(rng.choice(_WORDS))
            elif r < 0.85:
                words.append(rng.choice(invented))
            elif r < 0.93:
                words.append(rng.choice(_FOREIGN))
            else:
                words.append(str(rng.randint(0, 5000)))
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ",", ":"]))
    return sentences


def train_tokenizer(family: str, vocab_size: int | None = None, seed: int = 0) -> Any:
    """A ``tokenizers.Tokenizer`` for ``family`` trained on ``generate_corpus`` and filled to ``vocab_size``."""
    spec = FAMILIES[family]
    size = vocab_size or spec.vocab_size
    corpus = generate_corpus(seed=seed)
    if spec.tokenizer == "unigram":
        tokenizer = _train_unigram(corpus, size, spec.special_tokens)
    else:
        tokenizer = _train_byte_bpe(corpus, size, spec.special_tokens, spec.add_bos)
    got = tokenizer.get_vocab_size()
    if got != size:
        raise RuntimeError(f"{family}: tokenizer has {got} entries, the model {size}")
    return tokenizer


def _train_byte_bpe(corpus: list[str], size: int, specials: tuple[str, ...], add_bos: bool) -> Any:
    """Byte-level BPE (GPT-2 style); the GPT-2 family keeps its single special token at the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # GPT-2-style checkpoints put <|endoftext|> last; Llama puts <unk> <s> </s> first.
    specials_last = specials == _ENDOFTEXT
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size - (len(specials) if specials_last else 0),
        min_frequency=2,
        special_tokens=[] if specials_last else list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    _fill_vocab(vocab, size - (len(specials) if specials_last else 0))
    added = []
    if specials_last:
        for token in specials:
            vocab[token] = len(vocab)
    for token in specials:
        added.append(_added_token(vocab[token], token))
    data["model"]["vocab"] = vocab
    data["added_tokens"] = added
    tokenizer = Tokenizer.from_str(json.dumps(data))
    if add_bos:
        bos = specials[1]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _fill_vocab(vocab: dict[str, int], size: int) -> None:
    """Append concatenations of existing pieces until ``vocab`` has ``size`` entries (deterministic).

    The appended entries have no merge rule, so encoding never produces them, but a model can emit them
    and they decode to real bytes (often partial UTF-8 characters, which is what streaming must handle).
    """
    pieces = sorted(vocab, key=lambda t: vocab[t])
    rng = random.Random(len(pieces))
    while len(vocab) < size:
        token = rng.choice(pieces) + rng.choice(pieces)
        if token not in vocab:
            vocab[token] = len(vocab)


def _train_unigram(corpus: list[str], size: int, specials: tuple[str, ...]) -> Any:
    """SentencePiece-style Unigram (Metaspace), specials first like T5: <pad>=0, </s>=1, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=min(size, 8000), special_tokens=list(specials), unk_token=specials[2], show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    pieces: list[list[Any]] = data["model"]["vocab"]
    known = {p for p, _ in pieces}
    lowest = min(score for _, score in pieces[len(specials) :])
    rng = random.Random(len(pieces))
    words = [p for p, _ in pieces[len(specials) :]]
    while len(pieces) < size:
        piece = rng.choice(words) + rng.choice(words).lstrip("▁")
        if piece not in known:
            known.add(piece)
            # Below every trained piece: encoding prefers what the trainer learnt.
            pieces.append([piece, lowest - 1.0])
    data["model"]["vocab"] = pieces
    tokenizer = Tokenizer.from_str(json.dumps(data))
    eos = specials[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, 1)]
    )
    return tokenizer


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def decoder_config(name: str, vocab_size: int | None = None) -> Any:
    """The transformers config of seed ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown decoder seed {name!r}; choose one of {', '.join(DECODER_FAMILIES)}")
    spec = FAMILIES[name]
    return spec.config(vocab_size or spec.vocab_size)


def build_decoder_seed(name: str, out_dir: Path, **options: Any) -> Path:
    """Build generative seed ``name`` as a checkpoint directory in ``out_dir`` and return it.

    Options: ``seed`` (weights and tokenizer, 0), ``vocab_size`` (model and tokenizer; the family's
    default otherwise), ``max_new_tokens`` (written to generation_config.json, 64).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, PreTrainedTokenizerFast

    seed = int(options.pop("seed", 0))
    vocab_size = options.pop("vocab_size", None)
    max_new_tokens = int(options.pop("max_new_tokens", 64))
    if options:
        raise ValueError(f"unknown options for a decoder seed: {sorted(options)}")
    config = decoder_config(name, int(vocab_size) if vocab_size else None)
    spec = FAMILIES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # transformers initialises weights from the global generator: the same seed gives the same bytes.
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    model.eval()
    if config.model_type == "t5":
        _vary_t5(model)
    generation = GenerationConfig(
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        decoder_start_token_id=getattr(config, "decoder_start_token_id", None),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    model.generation_config = generation
    model.save_pretrained(out)

    raw = train_tokenizer(name, config.vocab_size, seed=seed)
    tokens = _special_token_kwargs(name, spec)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=_max_positions(config), **tokens)
    tokenizer.save_pretrained(out)
    _set_tokenizer_class(out, spec)
    log.info("built decoder seed %s (%d parameters) in %s", name, model.num_parameters(), out)
    return out


def _vary_t5(model: Any) -> None:
    """Make a random T5 produce varied tokens.

    With T5's initialisation the tied, unit-variance embedding dominates the residual stream, so a random
    model predicts the token it was fed (the decoder start, id 0) at every step: any decoder, cached or
    not, right or wrong, would agree with torch. A small embedding and a stronger relative position bias
    make the output depend on the source and on the position, so correctness checks can fail.
    """
    import torch

    with torch.no_grad():
        model.shared.weight.mul_(0.02)
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(10.0)


def _special_token_kwargs(name: str, spec: _Family) -> dict[str, str]:
    if spec.tokenizer == "unigram":
        return {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if spec.special_tokens == _ENDOFTEXT:
        end = _ENDOFTEXT[0]
        return {"bos_token": end, "eos_token": end, "unk_token": end, "pad_token": end}
    return {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}


def _max_positions(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 512


def _set_tokenizer_class(out: Path, spec: _Family) -> None:
    """Declare the tokenizer class the real checkpoint declares (onnxruntime-genai's tokenizer reads it)."""
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = spec.tokenizer_class
    if spec.add_bos:
        data["add_bos_token"] = True
        data["add_eos_token"] = False
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
