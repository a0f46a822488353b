"""HybridLM: a decoder-only language model whose layers are named by a string of mixer letters.

    model = HybridLM(vocab_size=256, d_model=512, layers="MMMMAMMM")        # Jamba-style (1 attention : 7)
    model = HybridLM(256, 512, layers="LLLLLG", mixer_options={"L": {"window": 1024}})   # Gemma-3-style
    model = HybridLM(256, 512, layers="EEEE")                               # pure GLA

Each layer is a pre-norm residual block, ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))``; a final RMSNorm
and an output head tied to the embedding. Letters are listed in ``subquad.nn.REGISTRY``.

Generation runs each layer with its own cache (``new_caches``): the prompt in one forward pass (prefill), then
one token at a time, so a recurrent layer costs O(1) per token and a sliding-window layer O(window).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mlp import SwiGLU, swiglu_hidden
from ..nn.norm import RMSNorm
from ..nn.registry import build_mixer, lookup, parse_layers

#: a compiled step's caches hold a power of two of tokens, at least this many
COMPILED_CACHE_MIN = 256
# the mixers' and the MLP's output projections, which write into the residual stream
RESIDUAL_OUT = ("o_proj", "out_proj", "wo", "down")


class Block(nn.Module):
    """A pre-norm residual block: ``x + mixer(norm(x))``, then ``x + SwiGLU(norm(x))``."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class HybridLM(nn.Module):
    """Args:
        vocab_size: tokens (256 for bytes).
        d_model: width.
        layers: one letter per layer (``"MMMAMMMA"``) or a list of mixer names.
        heads: heads of every mixer (default ``max(1, d_model // 64)``) but Mamba-2, whose heads are 64 wide where
            64 divides its inner width; ``kv_heads`` for softmax attention.
        mixer_options: per letter or name, the mixer's keyword arguments, e.g. ``{"L": {"window": 256}}`` (a
            mixer's own ``heads`` overrides the model's).
        mlp_ratio: SwiGLU hidden width over ``d_model`` (8/3).
        tie_embeddings: the output head shares the embedding matrix.
    ``config`` keeps the arguments (JSON-friendly) so a checkpoint can rebuild the model.
    """

    def __init__(self, vocab_size: int, d_model: int, layers="MMMAMMMA", *, heads: int | None = None,
                 kv_heads: int | None = None, mixer_options: dict | None = None, mlp_ratio: float = 8 / 3,
                 tie_embeddings: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model: expected a positive int, got {d_model!r}")
        if heads is None:
            heads = max(1, d_model // 64)
        elif not isinstance(heads, int) or heads <= 0:
            raise ValueError(f"heads: expected a positive int or None, got {heads!r}")
        specs = parse_layers(layers)
        options = {lookup(key).letter: dict(opts) for key, opts in (mixer_options or {}).items()}
        # (mixer_options copied: to_gqa rewrites it, and the caller's dict may build other models)
        self.config = dict(vocab_size=vocab_size, d_model=d_model,
                           layers=layers if isinstance(layers, str) else list(layers), heads=heads,
                           kv_heads=kv_heads,
                           mixer_options={key: dict(opts) for key, opts in (mixer_options or {}).items()},
                           mlp_ratio=mlp_ratio, tie_embeddings=tie_embeddings, norm_eps=norm_eps)
        self.layer_letters = "".join(s.letter for s in specs)
        self.embed = nn.Embedding(vocab_size, d_model)
        hidden = swiglu_hidden(d_model, mlp_ratio)
        blocks = []
        for i, spec in enumerate(specs):
            opts = dict(options.get(spec.letter, {}))
            if kv_heads is not None and spec.letter in "AGLD":
                opts.setdefault("kv_heads", kv_heads)
            blocks.append(Block(build_mixer(spec.letter, d_model, heads, i, **opts), d_model, hidden, norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(d_model, norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights(len(specs))
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, n_layers: int) -> None:
        """Normal(0, 0.02) for every Linear and the embedding, the residual output projections (``RESIDUAL_OUT``)
        scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual = name.rpartition(".")[2] in RESIDUAL_OUT
                nn.init.normal_(module.weight, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)

    def to_gqa(self, kv_heads: int, letters: str = "AGLD") -> "HybridLM":
        """Convert every softmax-attention layer (letters ``A``, ``G``, ``L``, ``D``, or those of ``letters``) to
        ``kv_heads`` key/value heads in place, each the mean of its group's trained heads
        (``subquad.nn.convert.mha_to_gqa``; the GQA paper then uptrains for ~5% of the original steps), and record
        it in ``config`` (the converted letters' options; the model's ``kv_heads`` too when every attention letter
        is converted), so that a checkpoint rebuilds the converted model. Returns the model."""
        from ..nn.convert import mha_to_gqa

        if not isinstance(letters, str) or not letters or any(c not in "AGLD" for c in letters):
            raise ValueError(f"letters: expected a non-empty string of the attention letters 'AGLD', got {letters!r}")
        converted = [blk.mixer for blk, letter in zip(self.blocks, self.layer_letters) if letter in letters]
        held = sorted({m.kv_heads for m in converted})
        # (checked before any layer changes: a failure halfway would leave a model its config cannot rebuild)
        if not (isinstance(kv_heads, int) and not isinstance(kv_heads, bool) and kv_heads > 0
                and all(n % kv_heads == 0 for n in held)):
            raise ValueError(f"kv_heads: expected a positive divisor of every attention layer's key/value heads "
                             f"({held}), got {kv_heads!r}")
        for mixer in converted:
            mha_to_gqa(mixer, kv_heads, n_heads=mixer.kv_heads)
        if set("AGLD") <= set(letters):
            self.config["kv_heads"] = kv_heads
        options = self.config["mixer_options"]
        for letter in sorted({c for c in self.layer_letters if c in letters}):
            # (only the letters converted: NSA's own kv_heads, say, still builds its unconverted projections)
            key = next((key for key in options if lookup(key).letter == letter), letter)
            options[key] = {**options.get(key, {}), "kv_heads": kv_heads}
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch: int, max_len: int, *, max_step: int = 1) -> list:
        """One cache per layer, each of the kind its mixer decodes with, for decoding steps of up to ``max_step``
        tokens (speculative decoding verifies several drafts a step): a sliding-window layer's ring holds
        ``max_step - 1`` more slots than its window, the other caches take steps of any length."""
        if not _is_int(max_step) or max_step < 1:
            raise ValueError(f"max_step: expected a positive int, got {max_step!r}")
        return [blk.mixer.new_cache(batch, max_len, max_step=max_step) for blk in self.blocks]

    def forward(self, ids: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """``ids`` ``(batch, seq)`` -> logits ``(batch, seq, vocab)``; with ``caches`` the tokens continue them."""
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"ids: expected an integer tensor (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches: expected {len(self.blocks)} caches (one per layer, from new_caches()), got "
                             f"{len(caches)}")
        x = self.embed(ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy (nats per token) over ``ids`` ``(batch, seq + 1)``."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten().long())

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, top_p: float | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None, return_logits: bool = False,
                 compile_step: bool = False, prompt_lengths: torch.Tensor | Sequence[int] | None = None,
                 pad_token_id: int = 0):
        """Sample ``max_new_tokens`` after ``prompt_ids`` ``(batch, prompt_len)``.

        ``temperature=0`` is greedy; ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set of most
        likely tokens whose probability reaches ``p`` (nucleus sampling; after ``top_k``). With ``eos_token_id``
        a row that has emitted it emits it again at every later step (Hugging Face pads finished rows the same
        way), and generation stops once every row has. ``use_cache=False`` re-runs the whole sequence for every
        token (the slow specification the cached path must match).
        Returns ``(batch, prompt_len + steps)`` ids, ``steps`` being ``max_new_tokens`` unless every row ended
        earlier (and with ``return_logits`` the logits of each step, ``(batch, steps, vocab)``).
        ``compile_step``: run the one-token steps through ``torch.compile(fullgraph=True)`` (compiled at the
        first call, kept for later ones; the prompt runs eagerly).

        ``prompt_lengths`` (``(batch,)`` ints, each in ``[1, prompt_len]``): prompts of different lengths, row
        ``b`` being ``prompt_ids[b, :prompt_lengths[b]]`` and the rest of it right padding, never read. Each row
        generates what it would alone (the same greedy tokens and logits): the shortest prompt is prefilled, then
        every row steps at once, a row still inside its prompt being fed its own next prompt token, and each row
        generates ``max_new_tokens`` after its own prompt. Returns ``(ids, lengths)``: ``ids``
        ``(batch, max(lengths))``, each row its prompt and generated tokens (through its first eos, where it emits
        one) right-padded with ``pad_token_id``, and ``lengths`` ``(batch,)`` those rows' lengths; with
        ``return_logits`` ``(ids, lengths, logits)``, ``logits[b, j]`` having chosen row ``b``'s ``j``-th generated
        token, ``(batch, steps, vocab)`` with ``steps`` the most tokens a row generated, zeros past a row's own.
        """
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids: expected (batch, prompt_len >= 1), got {tuple(prompt_ids.shape)}")
        bsz, prompt_len = prompt_ids.shape
        if prompt_lengths is None:
            lengths = torch.full((bsz, 1), prompt_len, device=prompt_ids.device)
            shortest = longest = prompt_len
            real = prompt_ids
        else:
            lengths, shortest, longest = _check_prompt_lengths(prompt_lengths, bsz, prompt_len, prompt_ids.device)
            # (the padding may hold any value: it is never read)
            real = prompt_ids[torch.arange(prompt_len, device=prompt_ids.device) < lengths]
        check_token_ids(real, self.config["vocab_size"])
        check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, self.config["vocab_size"])
        if compile_step and not use_cache:
            raise ValueError("compile_step: expected use_cache=True (the compiled step is the cached one-token "
                             "forward)")
        if not _is_int(pad_token_id):
            raise ValueError(f"pad_token_id: expected an int, got {pad_token_id!r}")
        step = self.compiled_step() if compile_step else self
        if not max_new_tokens:
            shortest = longest     # (no step to run: the prompts come back whole)
        ids = prompt_ids[:, :shortest]
        max_len = longest + max_new_tokens
        if compile_step:
            # storage of few shapes (at most twice the tokens): each new one compiles the step again, and on the
            # CPU the reference's graph is per storage length, so torch.compile's limit of 8 graphs would soon
            # be reached by lengths in multiples of a block
            max_len = max(COMPILED_CACHE_MIN, 1 << (max_len - 1).bit_length())
        caches = self.new_caches(bsz, max_len) if use_cache else None
        step_input = ids
        chosen_logits = []
        finished = torch.zeros(bsz, 1, dtype=torch.bool, device=ids.device)
        # pos: the position of the token each step chooses. A row still inside its prompt takes its own next prompt
        # token instead, so that every row's caches and states see its tokens alone, in order, and never padding
        for pos in range(shortest, longest + max_new_tokens):
            logits = (step if pos > shortest else self)(step_input if use_cache else ids, caches)[:, -1].float()
            nxt = sample(logits, temperature, top_k, generator, top_p=top_p)
            chosen_logits.append(logits)
            if pos < longest:
                nxt = torch.where(lengths > pos, prompt_ids[:, pos:pos + 1], nxt)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(finished, eos_token_id)
                finished = finished | ((nxt == eos_token_id) & (lengths <= pos))
            ids = torch.cat([ids, nxt], dim=1)
            step_input = nxt
            # (one read per step: what stopping early saves is a whole forward; a row past its max_new_tokens is
            # done too, what it samples now being dropped)
            if eos_token_id is not None and bool((finished | (lengths + max_new_tokens <= pos + 1)).all()):
                break
        if prompt_lengths is not None:
            return _each_rows_own(ids, chosen_logits, lengths, shortest, max_new_tokens, eos_token_id, pad_token_id,
                                  return_logits, self.config["vocab_size"])
        if not return_logits:
            return ids
        if not chosen_logits:
            return ids, torch.empty(bsz, 0, self.config["vocab_size"], device=ids.device)
        return ids, torch.stack(chosen_logits, 1)

    def compiled_step(self):
        """``torch.compile(self, fullgraph=True)``: a decoding step over the caches (one graph for every step; see
        the README's "Compiled decoding steps"). One compiled forward serves every model (their weights are the
        graph's inputs); it holds no model, so none is kept alive by it."""
        global _COMPILED_FORWARD
        if _COMPILED_FORWARD is None:
            # a graph per layer layout, batch size and cache length, all on HybridLM.forward's code: dynamo's
            # default of 8 graphs a code object fails a fullgraph compile past a few models (the flex backend
            # raises it too)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            _COMPILED_FORWARD = torch.compile(HybridLM.forward, fullgraph=True)
        return functools.partial(_COMPILED_FORWARD, self)


_COMPILED_FORWARD = None


def _is_int(x) -> bool:
    """An int, not a bool (``True`` would pass as 1)."""
    return isinstance(x, int) and not isinstance(x, bool)


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_prompt_lengths(prompt_lengths, batch: int, prompt_len: int, device) -> tuple[torch.Tensor, int, int]:
    """``generate``'s ``prompt_lengths`` -> ``(batch, 1)`` longs on ``device``, their least and their greatest."""
    expected = f"prompt_lengths: expected ({batch},) ints (one a row of prompt_ids) in [1, {prompt_len}]"
    if isinstance(prompt_lengths, torch.Tensor):
        if prompt_lengths.shape != (batch,) or prompt_lengths.dtype not in _INT_DTYPES:
            raise ValueError(f"{expected}, got a {prompt_lengths.dtype} tensor {tuple(prompt_lengths.shape)}")
        lengths = prompt_lengths.to(device, torch.long)
    elif isinstance(prompt_lengths, Sequence) and len(prompt_lengths) == batch and all(map(_is_int, prompt_lengths)):
        lengths = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
    else:
        raise ValueError(f"{expected}, got {prompt_lengths!r}")
    shortest, longest = (int(x) for x in torch.aminmax(lengths))
    if shortest < 1 or longest > prompt_len:
        raise ValueError(f"{expected}, got values in [{shortest}, {longest}]")
    return lengths[:, None], shortest, longest


def _each_rows_own(ids, chosen_logits, lengths, shortest, max_new_tokens, eos_token_id, pad_token_id, return_logits,
                   vocab):
    """``generate``'s result for ``prompt_lengths``, out of the rows stepped together: ``ids`` holds each row's
    own tokens from position 0, its generated ones from its ``lengths``, and the logits of step ``s`` chose
    position ``shortest + s`` of every row."""
    pos = torch.arange(ids.shape[1], device=ids.device)
    generated = (pos >= lengths) & (pos < lengths + max_new_tokens)
    if eos_token_id is not None:
        eos = generated & (ids == eos_token_id)
        generated &= eos.cumsum(1) <= eos       # a row ends at its first eos, as it would alone
    counts = generated.sum(1)
    totals = lengths[:, 0] + counts
    width = int(totals.max())
    out = ids[:, :width].masked_fill(pos[:width] >= totals[:, None], pad_token_id)
    if not return_logits:
        return out, totals
    if not chosen_logits:
        return out, totals, torch.empty(ids.shape[0], 0, vocab, device=ids.device)
    steps = torch.stack(chosen_logits, 1)
    j = torch.arange(int(counts.max()), device=ids.device)
    # (clamped: past its own tokens a row's index may point past the last step run; those rows are zeroed)
    index = (lengths - shortest + j).clamp(max=steps.shape[1] - 1)
    logits = steps.gather(1, index[..., None].expand(-1, -1, vocab))
    return out, totals, logits.masked_fill((j >= counts[:, None])[..., None], 0)


def check_token_ids(prompt_ids: torch.Tensor, vocab_size: int) -> None:
    """Every id of an integer ``prompt_ids`` in ``[0, vocab_size)`` (another dtype is the forward's to refuse).
    Checked before decoding, where one read of the prompt costs nothing beside the loop: out of range, the
    embedding fails with an IndexError on the CPU and a device-side assert on CUDA."""
    if prompt_ids.dtype in (torch.long, torch.int32) and prompt_ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(prompt_ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt_ids: expected token ids in [0, {vocab_size}), got values in [{lo}, {hi}]")


def check_sampling(max_new_tokens, temperature, top_k, top_p, eos_token_id, vocab_size: int) -> None:
    """``generate``'s arguments of what and how many tokens to sample."""
    # (NaN too: it reached torch.multinomial as NaN probabilities; None or a str failed the comparison, a TypeError)
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if top_k is not None and (not _is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
    _check_top_p(top_p)
    if eos_token_id is not None and not (_is_int(eos_token_id) and 0 <= eos_token_id < vocab_size):
        raise ValueError(f"eos_token_id: expected a token id in [0, {vocab_size}) or None, got {eos_token_id!r}")


def _check_top_p(top_p) -> None:
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a probability in (0, 1] or None, got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None,
           top_p: float | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``(batch, vocab)`` -> ``(batch, 1)``, drawn from ``probabilities``."""
    _check_top_p(top_p)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator)


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """The distribution ``sample`` draws from, ``(..., vocab)`` like ``logits``: their softmax at
    ``temperature``, restricted to the ``top_k`` most likely tokens, then to the nucleus of ``top_p``; for
    ``temperature=0``, one-hot at the argmax (greedy decoding's choice)."""
    _check_top_p(top_p)
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        # a token is dropped when the more likely ones already reach top_p (the most likely is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)
