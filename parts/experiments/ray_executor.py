"""Run a driver plan on the workers of a Ray cluster (`parts sweep ... --ray auto|local`).

The same `Work.run` as in one process, elsewhere: one Ray actor per GPU (or per `gpus_per_worker`
GPUs; on a cluster without GPUs, per CPU), each loading a model once and taking settings until none
is left. Settings of a model go to a worker that has it loaded; a free worker moves to the model
with the most settings left per worker. Each setting writes its own run folders atomically (from
the worker), and its result (e.g. `results.csv` rows) comes back to the driver, the only writer of
shared tables. A worker that dies (killed, out of memory, its node lost) loses only the setting it
was running: that setting goes back in the queue for a fresh worker, up to `max_retries` times.
Ray is an optional extra (`pip install 'parts[ray]'`).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

import parts
from parts.errors import PartsError
from parts.experiments.driver import LazyModel, Record, Work, by_model
from parts.experiments.options import RunOptions
from parts.experiments.runner import Loader, ModelSpec, load_spec
from parts.progress import Progress

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
except ImportError:  # the optional extra is not installed: RayExecutor says how to install it
    ray = None  # type: ignore[assignment]

INSTALL = "pip install 'parts[ray]'"


class SettingWorker:
    """A Ray actor: keeps one model loaded and runs the settings it is given (`Work.run`)."""

    def __init__(self, options: RunOptions, loader: Loader | None, cwd: str | None = None):
        # Relative paths (--out, a model folder) mean what they mean to the driver: a worker of a cluster
        # started elsewhere (`ray start`) would otherwise read and write under its own working directory.
        if cwd is not None:
            if not os.path.isdir(cwd):
                raise PartsError(f"the Ray worker on {os.uname().nodename} has no folder {cwd} (the driver's working "
                                 "directory): run the driver from a folder every node mounts at the same path")
            os.chdir(cwd)
        self.options, self.loader = options, loader
        self.spec: ModelSpec | None = None
        self.model: LazyModel | None = None

    def pid(self) -> int:
        return os.getpid()

    def run(self, work: Work) -> tuple[bool, Any]:
        """(whether it ran, its result); a setting finished meanwhile by someone else is not run again."""
        if work.model != self.spec:
            self.spec, self.model = work.model, None  # free the previous model before loading the next
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.model = LazyModel(partial(load_spec, work.model, self.options, self.loader))
        if work.is_done(self.options):
            return False, None
        assert self.model is not None
        return True, work.run(self.model, self.options)


def options_for_workers(options: RunOptions, device: str | None) -> RunOptions:
    """The driver's options as a worker needs them: no progress bars, the worker's device, and the data folder
    as the driver sees it, absolute ($PARTS_DATA_DIR is the driver's environment, not the workers')."""
    data_dir = options.data_dir or os.environ.get("PARTS_DATA_DIR") or None
    return options.replace(progress=False, device=device,
                           data_dir=None if data_dir is None else str(Path(data_dir).resolve()))


def next_setting(queues: dict[ModelSpec, deque[Work]], loaded: dict[Any, ModelSpec], worker: Any) -> Work | None:
    """The next setting for a free `worker` (taken off `queues`, one queue per model): one of the model it has
    loaded while any is left, else one of the model with the most settings left per worker already on it
    (`loaded`: each worker's model), so each model is loaded as few times as possible."""
    spec = loaded.get(worker)
    if spec is not None and queues.get(spec):
        return queues[spec].popleft()
    left = [s for s, queue in queues.items() if queue]
    if not left:
        return None
    on_it = {s: sum(1 for other, model in loaded.items() if model == s and other is not worker) for s in left}
    return queues[max(left, key=lambda s: len(queues[s]) / (1 + on_it[s]))].popleft()


class RayExecutor:
    """Runs the settings on Ray workers: `address` "auto" joins the running cluster, "local" starts one here.

    `workers`: how many actors (default: the cluster's GPUs / `gpus_per_worker`, or its CPUs when
    `gpus_per_worker` is 0). `gpus_per_worker` (default 1 when the cluster has GPUs, else 0): more
    than one loads each model across them with Hugging Face's `device_map="auto"`. `on_start(pid, work)`
    is called in the driver when a worker process is given a setting (tests use it to kill workers).
    """

    def __init__(self, address: str = "auto", gpus_per_worker: float | None = None, workers: int | None = None,
                 max_retries: int = 3, on_start: Callable[[int, Work], None] | None = None):
        if ray is None:
            raise PartsError(f"--ray needs Ray, which is not installed: {INSTALL}")
        if address not in ("auto", "local"):
            raise PartsError(f"--ray {address}: use auto (join the running Ray cluster) or local (start one here)")
        self.address, self.gpus_per_worker, self.workers = address, gpus_per_worker, workers
        self.max_retries, self.on_start = max_retries, on_start

    def _connect(self) -> bool:
        """Connect to (or start) the cluster; True if this call started the connection (and must end it)."""
        if ray.is_initialized():
            return False
        # Workers import this same `parts` (a checkout run in place, not only an installed copy).
        runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
            [str(Path(parts.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}}
        try:
            if self.address == "local":
                ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)
            else:
                ray.init(address="auto", runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as err:
            raise PartsError(f"no running Ray cluster found ({err}): start one with `ray start --head`, "
                             "or use --ray local for this machine only") from None
        return True

    def worker_count(self, n_settings: int) -> tuple[int, float]:
        """(workers, GPUs per worker) for this cluster and this many settings."""
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        per_worker = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        if per_worker > gpus:
            raise PartsError(f"--gpus-per-worker {per_worker:g} but the Ray cluster has {gpus:g} GPUs")
        fits = int(gpus // per_worker) if per_worker else int(resources.get("CPU", 1))
        return max(1, min(self.workers or fits, n_settings)), per_worker

    def run(self, pending: Sequence[Work], options: RunOptions, loader: Loader | None, done: Record,
            bar: Progress) -> None:
        started = self._connect()
        actors: list[Any] = []
        try:
            n_workers, per_worker = self.worker_count(len(pending))
            device = options.device if per_worker == 0 else ("cuda" if per_worker <= 1 else "auto")
            worker_options = options_for_workers(options, device)
            actor_class = ray.remote(num_cpus=1, num_gpus=per_worker, max_restarts=0)(SettingWorker)
            queues: dict[ModelSpec, deque[Work]] = {}
            for work in by_model(pending):
                queues.setdefault(work.model, deque()).append(work)
            loaded: dict[Any, ModelSpec] = {}  # actor -> the model it has loaded
            in_flight: dict[Any, tuple[Any, Work]] = {}  # result ref -> (actor, setting)
            pids: dict[Any, int] = {}
            attempts: dict[int, int] = {}

            def start(actor: Any) -> None:
                work = next_setting(queues, loaded, actor)
                if work is None:
                    return
                loaded[actor] = work.model
                if self.on_start is not None:
                    if actor not in pids:
                        pids[actor] = ray.get(actor.pid.remote())
                    self.on_start(pids[actor], work)
                in_flight[actor.run.remote(work)] = (actor, work)

            def new_actor() -> Any:
                actor = actor_class.remote(worker_options, loader, os.getcwd())
                actors.append(actor)
                return actor

            for _ in range(n_workers):
                start(new_actor())
            while in_flight:
                bar.set_postfix_str(f"{len(in_flight)} running on {len(actors)} Ray workers")
                [ref], _ = ray.wait(list(in_flight), num_returns=1)
                actor, work = in_flight.pop(ref)
                try:
                    ran, result = ray.get(ref)
                except RayActorError:
                    # The worker died mid-setting: nothing of that setting was kept (folders are written
                    # atomically), so it goes back to the front of its queue, for a fresh worker.
                    tries = attempts[id(work)] = attempts.get(id(work), 0) + 1
                    if tries > self.max_retries:
                        raise PartsError(f"setting {work.label} lost its Ray worker {tries} times (out of memory?): "
                                         "finished settings are saved; check the workers' logs, then rerun") from None
                    queues[work.model].appendleft(work)
                    actors.remove(actor)
                    loaded.pop(actor, None)
                    start(new_actor())
                    continue
                except RayTaskError as err:
                    # The setting itself failed (bad data, non-finite logits): stop, as a local run would.
                    raise (err.cause if isinstance(err.cause, Exception) else err) from None
                if ran:
                    done(work, result)
                else:
                    bar.update(1, work.label, "finished by another process")
                start(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()
