"""Getting a model and its tokenizer: from the hub, from a folder, or new (from scratch)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerBase

from lmtune import atomic, runs
from lmtune.config import Config
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report

log = logging.getLogger("lmtune")

EOS = "<|endoftext|>"  # GPT-2's end-of-text token, reused by tokenizers lmtune trains
MAX_BLOCK = 1024  # default block size cap: longer blocks cost memory faster than they help
MODEL_FILES = ("config.json", "adapter_config.json")  # a model folder, or a LoRA run's adapter folder


def looks_local(name: str) -> bool:
    """A path the user meant as a folder, as opposed to a hub id like `gpt2` or `org/model`."""
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def from_pretrained(loader: Any, name: str, what: str, **kwargs: Any) -> Any:
    """Call a transformers loader and turn its failures into one clear line."""
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise LmtuneError(f"no such {what} folder: {name}")
        name = str(path)
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(name, **kwargs)
    except SafetensorError as err:  # a weights file cut short (an interrupted copy or download) or overwritten
        if Path(name).is_dir():
            raise LmtuneError(
                f"cannot load {what} from {name}: {damaged_file(Path(name))} is damaged or incomplete "
                f"({first_line(err)}); copy it again"
            ) from None
        raise LmtuneError(
            f"cannot load {what} {name}: its weights in the Hugging Face cache are damaged or incomplete "
            f"({first_line(err)}); remove them with `hf cache rm model/{name}` and download again"
        ) from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise LmtuneError(
                f"{what} {name} needs code shipped with it; pass --trust-remote-code if you trust its author"
            ) from None
        raise LmtuneError(f"cannot load {what} {name}: {first_line(err)}") from None
    except OSError as err:
        if Path(name).is_dir():
            raise LmtuneError(f"cannot load {what} from {name}: {first_line(err)}") from None
        raise LmtuneError(
            f"cannot find {what} `{name}` on the hub or in the local cache "
            "(offline, misspelt, or private without a token?); or pass a local folder"
        ) from None


def damaged_file(folder: Path) -> str:
    """The name of the first weights file in `folder` whose header safetensors refuses."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):  # reads and checks the header only
                pass
        except Exception:
            return path.name
    return "a weights file"


def load_tokenizer(
    name: str, trust_remote_code: bool = False, what: str = "tokenizer", needs_eos: bool = True
) -> PreTrainedTokenizerBase:
    """The tokenizer at `name`; `what` names it in errors ("model" when it comes with the model). needs_eos:
    refuse one without EOS (training joins documents with it; generating only stops at it when there is one)."""
    folder = Path(name).expanduser()
    if what == "model" and folder.is_dir() and not any((folder / f).is_file() for f in MODEL_FILES):
        raise LmtuneError(
            f"{name} is not a model folder (no config.json); pass a run folder, a save_pretrained folder or a hub id"
        )
    if folder.is_dir() and not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise LmtuneError(f"{name} has no tokenizer files; pass --tokenizer with a tokenizer folder or hub id")
    tok = from_pretrained(AutoTokenizer, name, what, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None and needs_eos:
        raise LmtuneError(f"tokenizer {name} has no EOS token, which lmtune joins documents with")
    if tok.pad_token is None:
        # GPT-2 has no pad token. Training packs blocks and never pads; generation pads prompts on the
        # left with EOS (any token without one) and masks them out, which is the standard, harmless choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    tok.padding_side = "left"
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2's kind: any text encodes, nothing is unknown) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so no text is unknown
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    tok.padding_side = "left"
    return tok


def new_model_config(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> Any:
    """GPT-2 shaped config for a from-scratch model: the --model's shape (or GPT-2 small's), with overrides."""
    base = (
        from_pretrained(AutoConfig, cfg.model, "model config", trust_remote_code=cfg.trust_remote_code)
        if cfg.model
        else GPT2Config()
    )
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(cfg, k)}
    for key, value in shape.items():
        if not hasattr(base, key):
            raise LmtuneError(f"--{key.replace('_', '-')} only applies to GPT-2 shaped models, not {base.model_type}")
        setattr(base, key, value)
    if base.n_embd % base.n_head:
        raise LmtuneError(f"n_embd ({base.n_embd}) must be a multiple of n_head ({base.n_head})")
    base.vocab_size = len(tokenizer)
    base.bos_token_id = base.eos_token_id = tokenizer.eos_token_id
    base.pad_token_id = tokenizer.pad_token_id
    return base


# GPT-2's "gelu_new" is the tanh GELU written as five Python tensor ops; torch's one kernel computes the
# same function to float rounding, 10% faster per training step on CPU (bench/). The saved config keeps
# the original name, so a saved model is what it was.
FAST_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
# Config attributes that hold dropout probabilities, across the model families lmtune meets.
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout")


def build(config: Any, make: Any, dropout: float | None = None) -> Any:
    """`make(config)` with fast activations and, if given, every dropout probability set to `dropout`."""
    activation = getattr(config, "activation_function", None)
    if activation in FAST_ACTIVATIONS:
        config.activation_function = FAST_ACTIVATIONS[activation]
    if dropout is not None:
        for key in DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, dropout)
    model = make(config)
    if activation in FAST_ACTIVATIONS:
        model.config.activation_function = activation
    return model


def load_pretrained(
    name: str,
    dtype: Any,
    trust_remote_code: bool,
    dropout: float | None = None,
    quantized: dict[str, Any] | None = None,
) -> Any:
    """A pretrained causal LM from the hub or a folder, with the speed-ups of `build`; `quantized`: the
    arguments of `quantization`, its weights held by bitsandbytes."""
    config = from_pretrained(AutoConfig, name, "model config", trust_remote_code=trust_remote_code)
    model = build(config, lambda c: load_weights(name, c, dtype, trust_remote_code, quantized or {}), dropout)
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for its AVX-512 BF16 kernel the first time a layer runs in eval
        # mode (evaluation before training): it fails on layers narrower than a quantization block of 64
        # inputs, and the repacked weights then train through another path. One format, always.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def require_bitsandbytes(what: str) -> None:
    """Fail with one line naming the extra to install when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LmtuneError(f"{what} needs bitsandbytes: pip install 'lmtune[quantize]'") from None


def quantization(kind: str, compute_dtype: Any, device: Any) -> dict[str, Any]:
    """from_pretrained's arguments for frozen base weights in 4 bits (QLoRA's NF4 with double quantization,
    multiplied in `compute_dtype`) or 8 (LLM.int8), loaded straight onto `device`."""
    require_bitsandbytes(f"--quantize {kind}")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # the blocks' scales quantized too: 0.4 bits less per weight
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return {"quantization_config": config, "device_map": {"": str(device)}}


def load_weights(name: str, config: Any, dtype: Any, trust_remote_code: bool, quantized: dict[str, Any]) -> Any:
    """The model at `name` built from `config`; a weight whose shape config.json contradicts is an error."""
    # On a shape mismatch transformers raises "look at the above report!", the report being a log line
    # that lmtune silences. Loading with ignore_mismatched_sizes returns the mismatches to name instead;
    # the model, its mismatched weights freshly initialized, is never used.
    model, info = from_pretrained(
        AutoModelForCausalLM,
        name,
        "model",
        config=config,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        **quantized,
    )
    mismatched = info["mismatched_keys"]  # {(key, shape in the weights, shape config.json makes)}
    if mismatched:
        order = {key: i for i, key in enumerate(model.state_dict())}
        key, found, expected = min(mismatched, key=lambda m: (order.get(m[0], len(order)), m[0]))
        others = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise LmtuneError(
            f"config.json does not match the weights in {name}: {key} is {list(found)} in the weights "
            f"but config.json makes it {list(expected)}{others}; put back the config.json saved with these weights"
        )
    return model


def load_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, quantized: dict[str, Any] | None = None) -> Any:
    """The model to train: pretrained weights from --model (quantized: see `quantization`), or new random
    ones with --from-scratch."""
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if cfg.from_scratch:
        # "auto" follows a checkpoint's dtype; a new model has none, so it starts in float32.
        new_dtype = torch.float32 if dtype == "auto" else dtype
        model = build(
            new_model_config(cfg, tokenizer),
            lambda c: AutoModelForCausalLM.from_config(c, dtype=new_dtype),
            cfg.dropout,
        )
    else:
        assert cfg.model, "checked by the caller"
        model = load_pretrained(cfg.model, dtype, cfg.trust_remote_code, cfg.dropout, quantized)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise LmtuneError(
                f"the tokenizer has {len(tokenizer)} tokens but the model only {model.get_input_embeddings().num_embeddings}"
                " embeddings; use the model's own tokenizer"
            )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def transformers_model(model: Any) -> Any:
    """The transformers model inside peft's LoRA wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on."""
    return bool(getattr(transformers_model(model), "is_activation_checkpointing", False))


def checkpoint_activations(model: Any) -> None:
    """Activation checkpointing on: each layer keeps only its input and recomputes the rest in backward
    (non-reentrant torch.utils.checkpoint, which also replays dropout's random masks exactly)."""
    inner = transformers_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise LmtuneError(f"--gradient-checkpointing: {type(inner).__name__} does not support activation checkpointing")
    inner.activation_checkpointing_enable()


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions allow (None if it does not say)."""
    mc = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(mc, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_block_size(requested: int | None, model: torch.nn.Module) -> int:
    context = context_length(model)
    if requested is None:
        return min(context or MAX_BLOCK, MAX_BLOCK)
    if context is not None and requested > context:
        raise LmtuneError(f"--block-size {requested} is longer than the model's context of {context} tokens")
    return requested


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, 4-bit weights counted by their shape (bitsandbytes packs two into each stored byte)."""
    quant = [getattr(p, "quant_state", None) for p in model.parameters()]
    return sum(q.shape.numel() if q is not None else p.numel() for p, q in zip(model.parameters(), quant, strict=True))


def get_tokenizer(cfg: Config) -> Any:
    """The given tokenizer, or the model's own (from scratch with neither: `trained_tokenizer`)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    assert cfg.model, "the caller trains a tokenizer when there is neither"
    return load_tokenizer(cfg.model, cfg.trust_remote_code, what="model")


def trained_tokenizer(texts: Callable[[], Iterable[str]], key: str, vocab_size: int, report: Report) -> Any:
    """A tokenizer trained on `texts` (the training documents, handed in by the data layer), cached under `key`.

    Trained on the training split; when validation is held out of it later, its documents were seen by the
    tokenizer (only the vocabulary, never the model), as in most from-scratch recipes.
    """
    folder = runs.home() / "tokenizers" / key
    if not folder.is_dir():
        report({"event": "phase", "phase": "training a tokenizer"})
        tok = train_tokenizer(texts(), vocab_size)
        with atomic.written_beside(folder, folder=True) as tmp:
            tok.save_pretrained(tmp)
    return load_tokenizer(str(folder))
