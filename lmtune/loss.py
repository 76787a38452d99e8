"""Next-token cross-entropy computed from the last hidden states a chunk of rows at a time.

The usual path builds all (tokens, vocab) logits, upcasts them, takes a log-softmax and keeps it for
backward: several copies of the largest tensor in the step (8 x 1024 tokens x 50k vocabulary x 4
bytes = 1.6 GB each). Here the logits of CHUNK rows exist at once, and the gradients are computed in the
same pass, so backward only scales them. Same sums, same float32 softmax; only the summation order differs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK = 1024  # rows of logits in memory at once: 1024 x 50k vocabulary x 4 bytes = 200 MB
IGNORE = -100  # target value of positions that are not scored (transformers' convention)

# Model types whose logits are exactly lm_head(last hidden state): no bias, soft-capping or scaling.
# Others take transformers' own loss.
LINEAR_HEAD_MODELS = {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


def supported(model: Any) -> bool:
    """True if the chunked loss computes exactly what `model(labels=...)` would for this model."""
    head = model.get_output_embeddings()
    return (
        model.config.model_type in LINEAR_HEAD_MODELS
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and getattr(model.config, "final_logit_softcapping", None) is None
    )


def last_hidden(
    model: Any, plain: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T, E) final hidden states (after the last norm): what the transformer body returns, taken by a hook
    while the call goes through model.forward, so that DDP's gradient hooks see it; logits_to_keep=1 makes
    the model's own head compute one position only.

    Not output_hidden_states=True: transformers 5 answers it with hooks it then keeps on every block, and
    those read a ContextVar, which breaks each compiled block's graph in two under --compile. The tokens are
    embedded here and passed as inputs_embeds: given input_ids and no mask, GPT-2's forward checks whether
    a row starts or ends with the config's pad id (lmtune's new models and many fine-tunes have one), a host
    sync on every forward."""
    got: list[torch.Tensor] = []
    embeds = plain.get_input_embeddings()(input_ids)  # (B, T, E); LoRA's wrapper when it adapts them
    hook = body(plain).register_forward_hook(lambda module, args, out: got.append(out[0]))
    try:
        model(**model_inputs(input_ids, position_ids, embeds), logits_to_keep=1)
    finally:
        hook.remove()
    return got[0]


def body(plain: Any) -> Any:
    """The transformer body of a causal LM (GPT2Model inside GPT2LMHeadModel, LlamaModel, ...)."""
    inner = plain.get_base_model() if hasattr(plain, "get_base_model") else plain  # peft's LoRA wrapper
    return inner.base_model


def model_inputs(
    input_ids: torch.Tensor, position_ids: torch.Tensor | None, embeds: torch.Tensor | None = None
) -> dict[str, Any]:
    """A scoring forward's arguments: the tokens, or their embeddings when given. Packed rows (position ids
    restarting at each conversation) go without a KV cache: transformers builds their block-diagonal mask
    only then (and looks for packing with one host sync per forward, which rows with plain positions and a
    cache skip)."""
    tokens = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
    if position_ids is None:
        return tokens
    return {**tokens, "position_ids": position_ids, "use_cache": False}


def next_token_nll(
    model: Any,
    plain: Any,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunked: bool,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed NLL (nats) of `targets` (B*(T-1),), IGNORE where not scored, predicted from `inputs` (B, T):
    position t predicts token t+1. `plain`: the model without DDP's or --compile's wrappers (see checkpoint.plain);
    chunked: the chunked loss (see `supported`), else the full logits. positions (B, T): the position ids
    of packed rows, restarting at each conversation; None: 0, 1, 2, ... in every row."""
    if chunked:
        hidden = last_hidden(model, plain, inputs, positions)[:, :-1].flatten(0, 1)  # (B*(T-1), E)
        return linear_cross_entropy(hidden, plain.get_output_embeddings().weight, targets)
    logits = model(**model_inputs(inputs, positions)).logits[:, :-1].flatten(0, 1)  # (B*(T-1), V)
    # Upcast: a bf16 log-softmax over 50k tokens loses digits.
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed NLL of softmax(hidden @ weight.T) at `targets`, with its gradients made in the forward pass."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # hidden (N, E), weight (V, E), targets (N,) with IGNORE where not scored
        grad_hidden = torch.empty_like(hidden)
        # Cast once to what the matmuls run in (bf16 under bf16 autocast): autocast would cast the weight for
        # each chunk's matmul, and the (C, V) gradient of the logits twice, once transposed.
        dtype = compute_dtype(hidden)
        h_in, w = hidden.to(dtype), weight.to(dtype)
        # A frozen head (LoRA keeps it fixed) needs no weight gradient: skip its (V, E) matmuls.
        wants_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape if wants_weight else (), dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_gradients = _compiled.get("gradients", _chunk_gradients)
        for i in range(0, len(hidden), CHUNK):
            nll, grad_h, grad_w = chunk_gradients(h_in[i : i + CHUNK], w, targets[i : i + CHUNK], wants_weight)
            total += nll
            grad_hidden[i : i + CHUNK] = grad_h
            if wants_weight:
                grad_weight += grad_w  # accumulated in float32
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad, grad_weight * grad if ctx.needs_input_grad[1] else None, None


def _chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Summed NLL of one chunk, its float32 logits (C, V), their log-sum-exp and which rows are scored."""
    # Upcast before the softmax: a bf16 log-softmax over a large vocabulary loses digits.
    logits = (h @ weight.T).float()  # (C, V)
    keep = t != IGNORE
    lse = torch.logsumexp(logits, dim=-1)  # (C,)
    target_logit = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    nll = ((lse - target_logit) * keep).sum()
    return nll, logits, lse, keep


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `hidden` run in: autocast's where it is on, else the tensor's own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return _chunk(h, weight, t)[0]


def _chunk_gradients(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, wants_weight: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk's summed NLL and its gradients in h (C, E) and, if wanted, in weight (V, E); h and weight in
    the matmuls' dtype. Eager, each op is a pass over the (C, V) float32 logits, so there are four: the upcast,
    log_softmax (one kernel: max, sum and output), exp in place and one cast for both matmuls. Rows not scored
    are zeroed on the (C, E) sides of the matmuls, not in the (C, V) gradient: the same sums."""
    keep = (t != IGNORE)[:, None].to(h.dtype)  # (C, 1)
    rows, target = torch.arange(len(t), device=t.device), t.clamp(min=0)
    # Upcast before the softmax: a bf16 log-softmax over a large vocabulary loses digits.
    logp = torch.log_softmax((h @ weight.T).float(), dim=-1)  # (C, V)
    nll = -(logp[rows, target] * keep.squeeze(1)).sum()
    probs = logp.exp_()
    probs[rows, target] -= 1  # d(NLL)/d(logits) = softmax - one_hot(target)
    probs = probs.to(weight.dtype)
    grad_h = (probs @ weight) * keep  # (C, E)
    return nll, grad_h, probs.T @ (h * keep) if wants_weight else None  # (V, E)


def _fused_chunk_gradients(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, wants_weight: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`_chunk_gradients` written for torch.compile: no in-place updates and the one-hot as a comparison,
    so softmax, one-hot, mask and cast fuse into one pass over the logits (the in-place form, compiled,
    measured 1.2x-1.6x slower on a CPU in bf16: `bench/loss.py --variants compiled inplace`)."""
    nll, logits, lse, keep = _chunk(h, weight, t)
    is_target = torch.arange(logits.shape[1], device=t.device) == t[:, None]  # (C, V)
    probs = ((torch.exp(logits - lse[:, None]) - is_target.float()) * keep[:, None]).to(weight.dtype)
    grad_h = probs @ weight  # (C, E)
    return nll, grad_h, probs.T.to(h.dtype) @ h if wants_weight else None  # (V, E)


# The chunk functions compiled by `compile_chunks`, by name; empty: eager.
_compiled: dict[str, Any] = {}


def compile_chunks() -> None:
    """From now on in this process, run each chunk of the loss as compiled kernels (torch.compile).

    Eager, the chunk's float32 logits are read and written about nine times (upcast, log-sum-exp, subtract,
    exp, one-hot, mask, cast): bound by memory bandwidth. Compiled, those fuse into the matmul's epilogue
    and a pass or two. Two compilations: the full chunk's shape, then one for any number of rows, as the
    ragged last chunk varies from batch to batch with padded chat rows (torch.compile's automatic dynamic
    shapes; dynamic=False would compile each new shape, and run eagerly once eight were compiled)."""
    _compiled["gradients"] = torch.compile(_fused_chunk_gradients)
    _compiled["nll"] = torch.compile(_chunk_nll)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (nats) of logits hidden @ weight.T at targets; differentiable in hidden and weight."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        result: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, targets)
        return result
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    chunk_nll = _compiled.get("nll", _chunk_nll)
    for i in range(0, len(hidden), CHUNK):
        total += chunk_nll(hidden[i : i + CHUNK], weight, targets[i : i + CHUNK])
    return total


class _TokenLogprobs(torch.autograd.Function):
    """Log-probability of each target under softmax(hidden @ weight.T), 0 where IGNORE, a chunk of rows of
    logits at a time. Unlike the summed NLL above, each token's gradient is scaled differently (DPO weighs
    each sequence by how wrong its pair is), so backward computes the chunk's logits again instead of the
    forward keeping their gradients: one more matmul, no (tokens, vocab) tensor kept."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)  # (N,)
        for i in range(0, len(hidden), CHUNK):
            h, t = hidden[i : i + CHUNK], targets[i : i + CHUNK]
            logits = (h @ weight.to(h.dtype).T).float()  # (C, V); upcast before the softmax
            target_logit = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            out[i : i + CHUNK] = (target_logit - torch.logsumexp(logits, dim=-1)) * (t != IGNORE)
        ctx.save_for_backward(hidden, weight, targets)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        wants_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
        w = weight.to(hidden.dtype)
        for i in range(0, len(hidden), CHUNK):
            h, t = hidden[i : i + CHUNK], targets[i : i + CHUNK]
            probs = torch.softmax((h @ w.T).float(), dim=-1)  # (C, V)
            # d logp / d logits = one_hot(target) - softmax, times the token's own gradient (0 where IGNORE)
            g = grad[i : i + CHUNK] * (t != IGNORE)
            d_logits = -probs * g[:, None]
            d_logits[torch.arange(len(t), device=t.device), t.clamp(min=0)] += g
            grad_hidden[i : i + CHUNK] = d_logits.to(h.dtype) @ w
            if grad_weight is not None:
                grad_weight += d_logits.T @ h.float()
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None


def token_logprobs(model: Any, plain: Any, inputs: torch.Tensor, labels: torch.Tensor, chunked: bool) -> torch.Tensor:
    """(B, T-1) log-probability of each label token given the ones before it (position t predicts labels[t + 1]),
    0 where IGNORE; differentiable. chunked: from the last hidden states a chunk at a time (see `supported`)."""
    targets = labels[:, 1:].flatten()
    if chunked:
        hidden = last_hidden(model, plain, inputs)[:, :-1].flatten(0, 1)  # (B*(T-1), E)
        out: torch.Tensor = _TokenLogprobs.apply(hidden, plain.get_output_embeddings().weight, targets)
    else:
        logits = model(input_ids=inputs).logits[:, :-1].flatten(0, 1).float()  # (B*(T-1), V)
        out = logits.log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * (targets != IGNORE)
    return out.view(len(inputs), -1)


def next_token_loss(
    model: Any,
    plain: Any,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    chunked: bool,
    accelerator: Any,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the label tokens of a batch (B, T), and how many there are (on device, no
    sync). Position t predicts labels[t + 1]; IGNORE labels (chat prompts, padding) are not counted."""
    targets = labels[:, 1:].flatten()
    with accelerator.autocast():
        total = next_token_nll(model, plain, inputs, targets, chunked, positions)
    return total, label_count(labels)


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a (B, T) batch are predicted and scored (on device)."""
    return (labels[:, 1:] != IGNORE).sum()
