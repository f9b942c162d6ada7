"""CompiledModel: what ``xllm_compiler.load`` returns: logits(), generate(), and the tokenizer if any."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence as SequenceType
from pathlib import Path
from typing import Any

import torch

from xllm_compiler.artifact.schema import Manifest
from xllm_compiler.errors import RequestError
from xllm_compiler.runtime.engine import Engine
from xllm_compiler.runtime.memory_budget import LoadMemory
from xllm_compiler.runtime.sampling import sample
from xllm_compiler.runtime.scheduler import Scheduler
from xllm_compiler.runtime.step import Sequence


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CompiledModel:
    """A loaded artifact, ready to run. Not thread-safe: one call at a time."""

    def __init__(self, root: Path, manifest: Manifest, engine: Engine, scheduler: Scheduler, memory: LoadMemory):
        self.root = root
        self.manifest = manifest
        self.engine = engine
        self.scheduler = scheduler
        self.memory = memory
        self.vocab_size: int = manifest.model.vocab_size
        self.max_seq_len: int = manifest.model.max_seq_len
        self.eos_token_ids: tuple[int, ...] = tuple(manifest.model.eos_token_ids)
        self.device = engine.device
        self._tokenizer = None

    # -- requests -----------------------------------------------------------------------------

    def _check_prompts(self, prompts: Any, max_new_tokens: int) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, SequenceType):
            raise RequestError("prompts must be a list of token-id lists")
        checked = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, torch.Tensor):
                prompt = prompt.tolist()
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, SequenceType):
                raise RequestError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
            if len(prompt) == 0:
                raise RequestError(f"prompt {i} is empty")
            try:
                ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
            except TypeError:
                ids = []
            if len(ids) != len(prompt):
                raise RequestError(f"prompt {i} holds a token id that is not an integer")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"prompt {i}: token id {bad} is outside [0, {self.vocab_size})")
            if len(ids) + max_new_tokens > self.max_seq_len:
                raise RequestError(self._too_long(i, len(ids), max_new_tokens))
            checked.append(ids)
        return checked

    def _too_long(self, i: int, prompt_tokens: int, new_tokens: int) -> str:
        needed, allowed = prompt_tokens + new_tokens, self.manifest.model.max_position_embeddings
        problem = (
            f"prompt {i}: {prompt_tokens} prompt tokens + {new_tokens} new tokens exceed max_seq_len {self.max_seq_len}"
        )
        if needed > allowed:
            return f"{problem}, and the model allows at most {allowed} positions"
        how = f"recompile with --max-seq-len {needed} or more (max_seq_len= from Python)"
        return f"{problem}: {how}; the model allows up to {allowed}"

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """float32 logits [len(prompts), vocab] at the last position of each prompt."""
        seqs = [Sequence(tokens=list(p), prompt_len=len(p)) for p in self._check_prompts(prompts, 0)]
        rows: dict[int, torch.Tensor] = {}

        def keep(batch: list[Sequence], logits: torch.Tensor) -> None:
            for seq, row in zip(batch, logits, strict=True):
                rows[id(seq)] = row
                seq.finished = True

        self.scheduler.run(seqs, keep)
        if not seqs:
            return torch.empty(0, self.vocab_size)
        return torch.stack([rows[id(seq)] for seq in seqs])

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> list[list[int]]:
        """New tokens for each prompt (greedy at temperature 0); a sequence stops at eos unless ignore_eos."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if not _is_real(temperature) or not 0 <= temperature < math.inf:
            raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not _is_real(top_p) or not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p!r}")
        checked = self._check_prompts(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return [[] for _ in checked]
        seqs = [Sequence(tokens=list(p), prompt_len=len(p), max_new_tokens=max_new_tokens) for p in checked]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        stop = set() if ignore_eos else set(self.eos_token_ids)

        def extend(batch: list[Sequence], logits: torch.Tensor) -> None:
            tokens = self.engine.group.agree(sample(logits, float(temperature), float(top_p), generator))
            for seq, token in zip(batch, tokens, strict=True):
                seq.tokens.append(token)
                seq.finished = len(seq.generated) >= seq.max_new_tokens or token in stop

        self.scheduler.run(seqs, extend)
        return [seq.generated for seq in seqs]

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

    def stats(self) -> dict[str, int]:
        """Graph-cache counters: bucket hits, fallbacks, padded tokens."""
        return dict(self.engine.graphs.counters)

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
            "kv_fragmentation": pool.fragmentation,
            "kv_peak_fragmentation": pool.peak_fragmentation,
            "kv_pool_sized_by": self.memory.sized_by,
            "weight_bytes": self.memory.weight_bytes,
        }
