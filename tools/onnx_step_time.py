"""Time one decode step in onnxruntime (the ONNX export of a decode bucket) next to our runtime, on CPU.

    python tools/onnx_step_time.py MODEL_DIR [--batch B] [--context N] [--steps N] [--threads N]

Compiles MODEL_DIR (cache off) with one decode bucket of B sequences, exports it with
``xllm_compiler.export_onnx``, prefills B random prompts of N tokens with our runtime, and then runs the same
decode steps from that cache in both: ours through ``Engine.step``, onnxruntime's (CPUExecutionProvider)
through ``InferenceSession.run`` fed each step's ``present_kv_cache_*`` outputs as the next step's inputs.
Both times include building the step's inputs on the host; onnxruntime gets the block table cut to the
blocks in use (its width is a symbolic dim of the export: the attention gathers every block it is given).
The artifact keeps the model's max_seq_len, as a deployed one would. Prints the median and min of each
in ms, and the largest logit difference relative to the largest logit.

onnxruntime copies every layer's cache once per step (ONNX has no in-place update: ScatterND writes a new
tensor), so its step grows with the pool; the pool here is sized to the batch's sequences, as load() does
with kv_blocks.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import xllm_compiler
from xllm_compiler.onnx import onnx_inputs
from xllm_compiler.runtime.step import Sequence, build_step_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batch", type=int, default=1, help="sequences per decode step (default %(default)s)")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens per sequence (default %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_seq_len = args.context + args.steps + 8
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "artifact"
        xllm_compiler.compile(
            args.model_dir,
            artifact,
            decode_buckets=[args.batch],
            prefill_buckets=[max_seq_len],
            cache_dir="",
        )
        path = xllm_compiler.export_onnx(artifact, Path(tmp) / "decode.onnx", "decode", args.batch)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, as ours
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = xllm_compiler.load(artifact, kv_blocks=1 + args.batch * -(-max_seq_len // 16))
        engine = model.engine
        vocab = model.manifest.model.vocab_size
        generator = torch.Generator().manual_seed(0)
        seqs = []
        for _ in range(args.batch):
            prompt = torch.randint(0, vocab, (args.context,), generator=generator).tolist()
            blocks = engine.pool.allocate(engine.blocks_for(max_seq_len))
            seqs.append(Sequence(tokens=prompt, prompt_len=args.context, blocks=blocks))
            engine.step("prefill", [(seqs[-1], args.context)])
        caches = [layer.clone() for layer in engine.kv_cache.layers]
        tokens = torch.randint(0, vocab, (args.steps + 2, args.batch), generator=generator).tolist()
        computed = [s.num_computed for s in seqs]
        width = engine.blocks_for(args.context + args.steps + 2)
        theirs, their_logits = [], []
        for step in tokens:  # onnxruntime first, then ours from the same cache: neither's threads disturb the other
            work = [(s, 1) for s in seqs]
            for seq, token in zip(seqs, step, strict=True):
                seq.tokens.append(token)
            start = time.perf_counter()
            inputs = build_step_inputs(
                work, args.batch, args.batch, engine.block_size, engine.max_blocks_per_seq, torch.device("cpu")
            )
            inputs["block_tables"] = inputs["block_tables"][:, :width]  # only the blocks in use
            logits, *present = session.run(None, onnx_inputs(inputs, caches))
            theirs.append(time.perf_counter() - start)
            caches = [torch.from_numpy(c) for c in present]
            their_logits.append(torch.from_numpy(logits[: args.batch]))
            for seq in seqs:
                seq.num_computed += 1
        for seq, count in zip(seqs, computed, strict=True):
            seq.num_computed = count
        ours, error = [], 0.0
        for got in their_logits:
            start = time.perf_counter()
            want = engine.step("decode", [(s, 1) for s in seqs])
            ours.append(time.perf_counter() - start)
            error = max(error, float((got - want).abs().max() / want.abs().max()))
    print(f"decode batch {args.batch}, context {args.context}, {args.steps} steps, {args.threads} threads")
    for name, times in (("xllm_compiler", ours[2:]), ("onnxruntime", theirs[2:])):
        print(f"  {name:14} {statistics.median(times) * 1e3:8.2f} ms/step (min {min(times) * 1e3:.2f})")
    print(f"  max |logits difference| / max |logit|: {error:.2e}")


if __name__ == "__main__":
    main()
