"""CompiledModel: what ``xllm_compiler.load`` returns: logits(), generate(), and the tokenizer if any."""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence as SequenceType
from pathlib import Path
from typing import Any

import torch

from xllm_compiler.artifact.schema import Manifest
from xllm_compiler.errors import RequestError
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.memory_budget import LoadMemory, expanded_kv_bytes_per_token, kv_bytes_per_token
from xllm_compiler.runtime.requests import Request, RequestOutput, SamplingParams
from xllm_compiler.runtime.scheduler import StepScheduler
from xllm_compiler.runtime.speculative import DraftSpeculator, NgramSpeculator, Speculator

#: Proposals per verify step when neither generate() nor the artifact (--num-speculative-tokens) names k.
DEFAULT_SPECULATIVE_TOKENS = 3
#: The scheduler counters that m.stats()["speculative"] sums over calls.
_SPECULATIVE_COUNTERS = ("proposed_tokens", "accepted_tokens", "verify_steps", "verified_sequences")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CompiledModel:
    """A loaded artifact, ready to run. Not thread-safe: one call at a time."""

    def __init__(self, root: Path, manifest: Manifest, engine: Engine, memory: LoadMemory):
        self.root = root
        self.manifest = manifest
        self.engine = engine
        self.memory = memory
        self.vocab_size: int = manifest.model.vocab_size
        self.max_seq_len: int = manifest.model.max_seq_len
        self.eos_token_ids: tuple[int, ...] = tuple(manifest.model.eos_token_ids)
        self.device = engine.device
        self._tokenizer = None
        self._speculative: Counter[str] = Counter()

    # -- requests -----------------------------------------------------------------------------

    def _check_prompts(self, prompts: Any, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, SequenceType):
            raise RequestError("prompts must be a list of token-id lists")
        return [self.check_prompt(prompt, max_new_tokens, index=i) for i, prompt in enumerate(prompts)]

    def check_prompt(self, prompt: Any, max_new_tokens: int, index: int | None = None) -> list[int]:
        """``prompt`` (token ids: a list or a 1-D tensor) as a list of ints, checked against the vocabulary and
        max_seq_len (with ``max_new_tokens`` to come); RequestError names the problem (and prompt ``index``)."""
        name = "prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, SequenceType):
            raise RequestError(f"{name} must be a list of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise RequestError(f"{name} is empty")
        try:
            ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
        except TypeError:
            ids = []
        if len(ids) != len(prompt):
            raise RequestError(f"{name} holds a token id that is not an integer")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"{name}: token id {bad} is outside [0, {self.vocab_size})")
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise RequestError(self._too_long(name, len(ids), max_new_tokens))
        return ids

    def _too_long(self, name: str, prompt_tokens: int, new_tokens: int) -> str:
        needed, allowed = prompt_tokens + new_tokens, self.manifest.model.max_position_embeddings
        problem = (
            f"{name}: {prompt_tokens} prompt tokens + {new_tokens} new tokens exceed max_seq_len {self.max_seq_len}"
        )
        if needed > allowed:
            return f"{problem}, and the model allows at most {allowed} positions"
        how = f"recompile with --max-seq-len {needed} or more (max_seq_len= from Python)"
        return f"{problem}: {how}; the model allows up to {allowed}"

    def make_scheduler(
        self,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        speculator: Speculator | None = None,
    ) -> StepScheduler:
        """A step-level scheduler on this model's engine and KV pool (runtime/scheduler.py): add requests,
        step, read outputs. Defaults keep every step inside the artifact's buckets (the largest decode bucket's
        sequences, the largest prefill bucket's tokens). Only one scheduler may be active at a time (generate()
        and logits() make their own for the call): two would share the pool without seeing each other's
        sequences, so neither could preempt the other's."""
        return StepScheduler(
            self.engine,
            eos_token_ids=self.eos_token_ids,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            speculator=speculator,
        )

    def _run(
        self, prompts: list[list[int]], params: SamplingParams, speculator: Speculator | None = None
    ) -> list[list[RequestOutput]]:
        scheduler = self.make_scheduler(speculator=speculator)
        try:
            outputs = scheduler.run(Request(str(i), p, params) for i, p in enumerate(prompts))
        finally:
            counters = scheduler.stats()
            self._speculative.update({name: int(counters[name]) for name in _SPECULATIVE_COUNTERS})
        return [outputs[str(i)] for i in range(len(prompts))]

    def speculator(self, speculative: Any, num_speculative_tokens: int | None = None) -> Speculator:
        """What ``generate(speculative=...)`` proposes with: "ngram" (prompt lookup) or a draft CompiledModel
        with this model's vocabulary; ``num_speculative_tokens`` (k) defaults to the artifact's
        --num-speculative-tokens, else DEFAULT_SPECULATIVE_TOKENS. A verify step of s sequences runs on the
        smallest verify or decode bucket of s·(k+1) rows, else on the fallback graph."""
        k = num_speculative_tokens
        if k is None:
            k = self.manifest.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RequestError(f"num_speculative_tokens must be a positive integer, got {k!r}")
        if speculative == "ngram":
            return NgramSpeculator(k)
        if isinstance(speculative, CompiledModel):
            return DraftSpeculator(speculative, k, self.vocab_size)
        raise RequestError(f"speculative must be 'ngram' or a draft model from xllm_compiler.load, got {speculative!r}")

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 logits [len(prompts), vocab] at the last position of each prompt."""
        checked = self._check_prompts(prompts, 0)
        if not checked:
            return torch.empty(0, self.vocab_size)
        runs = self._run(checked, SamplingParams(max_new_tokens=0, return_logits=True))
        return torch.stack([run[-1].logits for run in runs])

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        speculative: str | CompiledModel | None = None,
        num_speculative_tokens: int | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (greedy at temperature 0); a sequence stops at eos unless ignore_eos.
        With a seed every prompt samples from a generator of its own seeded with it, so a prompt's tokens do
        not depend on the others in the call.

        ``speculative`` ("ngram", or a draft model loaded with xllm_compiler.load) decodes speculatively, k =
        ``num_speculative_tokens`` proposals per verify step (see ``speculator``): the same tokens greedily, the
        same distribution when sampling; ``stats()["speculative"]`` tells how many proposals were kept."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if not _is_real(temperature) or not 0 <= temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not _is_real(top_p) or not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")
        speculator = None if speculative is None else self.speculator(speculative, num_speculative_tokens)
        checked = self._check_prompts(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return [[] for _ in checked]
        params = SamplingParams(max_new_tokens, float(temperature), float(top_p), seed, ignore_eos)
        runs = self._run(checked, params, speculator)
        return [[t for output in run for t in output.new_tokens] for run in runs]

    # -- text ---------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer.json as a ``tokenizers.Tokenizer`` (ValueError if it had none)."""
        if self._tokenizer is None:
            name = self.manifest.tokenizer
            if not name:
                raise RequestError(f"the artifact {self.root} has no tokenizer.json; pass token ids instead")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.root / name))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- introspection ------------------------------------------------------------------------

    #: Per MoE layer, the int64 [E + 1] buffer its graphs add routing counts into (load() sets them).
    expert_counts: tuple[torch.Tensor, ...] = ()

    def expert_stats(self) -> dict[str, Any]:
        """Tokens routed to each expert of each MoE layer since load, real tokens only (padding is masked
        in the graph): ``{"layers": [[count per expert] per MoE layer], "tokens": N}``. Every rank routes
        every token (the router is replicated under --tp and --ep), so each rank's counts are the whole
        model's and no collective is needed. Prefix-cache hits are not recomputed, so not counted."""
        counts = [c.tolist() for c in self.expert_counts]
        return {"layers": [c[:-1] for c in counts], "tokens": counts[0][-1] if counts else 0}

    def stats(self) -> dict[str, Any]:
        """Graph-cache counters (bucket hits, misses, fallbacks, padded tokens, steps) and, under
        ``speculative``, speculative decoding's totals since load: tokens proposed and accepted, the acceptance
        rate, verify steps, and the mean tokens a sequence's verify step wrote (kept proposals + the target's)."""
        spec = self._speculative
        verified = spec["verified_sequences"]
        return {
            **self.engine.graphs.counters,
            "speculative": {
                "proposed": spec["proposed_tokens"],
                "accepted": spec["accepted_tokens"],
                "acceptance_rate": round(spec["accepted_tokens"] / spec["proposed_tokens"], 4)
                if spec["proposed_tokens"]
                else 0.0,
                "verify_steps": spec["verify_steps"],
                "mean_accepted_length": round(1 + spec["accepted_tokens"] / verified, 3) if verified else 0.0,
            },
        }

    def _expanded_kv(self) -> dict[str, int]:
        """MLA only: the bytes per token expanded K and V would take, next to the latent's."""
        expanded = expanded_kv_bytes_per_token(self.manifest)
        return {"expanded_kv_bytes_per_token": expanded} if expanded else {}

    def memory_stats(self) -> dict[str, Any]:
        pool = self.engine.pool.stats()
        return {
            "arena_bytes": self.engine.graphs.arena.numel(),
            "arena_bytes_per_bucket": dict(self.engine.graphs.arena_plans),
            "kv_cache_bytes": self.engine.kv_cache.nbytes(),
            "kv_blocks_total": pool.total,
            "kv_blocks_used": pool.used,
            "kv_blocks_free": pool.free,
            "kv_blocks_peak": pool.peak_used,
            "kv_block_size": self.engine.block_size,
            "kv_bytes_per_token": kv_bytes_per_token(self.manifest),
            **self._expanded_kv(),
            "kv_fragmentation": pool.fragmentation,
            "kv_peak_fragmentation": pool.peak_fragmentation,
            "kv_pool_sized_by": self.memory.sized_by,
            "weight_bytes": self.memory.weight_bytes,
        }
