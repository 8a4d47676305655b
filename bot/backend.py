"""The seam between the bot and where the work runs.

The bot talks to one `Backend`: it submits a job (a checked request of one
job kind), reads the job record for progress, and awaits the result.

- `LocalBackend` runs the engines in this process, one engine and one worker
  thread per service, as a Modal container serves all of its class's methods
  (one model in memory per service, one job at a time on it), with state in
  SQLite under the data dir. Its engines come from an engine factory (the
  real engines unless it is given another, as tests give stand-ins), built
  when a job first needs one, so the bot alone never imports torch.
- `ModalBackend` spawns the deployed Modal classes and shares their state
  through the Modal Dict; every Modal call is `.aio`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from bot.settings import Settings
from bot.core.text import plural
from modal_services import remedies
from modal_services.errors import ErrorCode, ToolboxError
from modal_services.jobs.requests import JobRequest
from modal_services.jobs.records import (Job, JobStatus, create_job, found_job, found_jobs, job_retention_seconds,
                                         load_job, mark_dead, sweep_finished_jobs)
from modal_services.state.keys import call_key, forget_job
from modal_services.state.locks import holder_record
from modal_services.layout import Layout
from modal_services.safety.nsfw_classifier import NsfwClassifier
from modal_services.safety.tagger import Tagger
from modal_services.services import (NO_ENGINES_MESSAGE, SERVICES, Engine, EngineFactory, ServiceSpec, build_engine,
                                     missing_engine_libraries, require_models, run_service_job, service_for)
from modal_services.state.durable import DurableStore, local_homes, volume_homes
from modal_services.state.reconcile import reconcile_at_start
from modal_services.state.store import ModalDictStore, SqliteStore

log = logging.getLogger(__name__)

# Answering within 15 s: a missing or rejected Modal token fails at once, an unreachable Modal here.
MODAL_CONNECT_TIMEOUT = 10.0
# A local job's result waits this long for someone to collect it (/setup follows
# downloads by their records and never does), then it is let go.
RESULT_KEEP_SECONDS = 600
# How often a long-running local backend (the bot, `toolbox serve`) removes finished jobs past their retention.
JOB_SWEEP_INTERVAL_SECONDS = 3600
ENGINE_THREAD_PREFIX = "engine-"


class Backend(ABC):
    # The backend as TOOLBOX_BACKEND names it ("local", "modal"): the one name /health and `toolbox status` show.
    name: ClassVar[str]
    # Live keys in the Dict (SQLite locally); durable records in their files, cached there.
    store: DurableStore

    @abstractmethod
    async def submit(
        self,
        request: JobRequest,
        owner: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Create `job:<id>` (queued; under `job_id` if one was chosen in advance) and start the work
        of `request`; returns at once.

        The request was checked when it was built, so a bad value never gets this far."""

    @abstractmethod
    async def result(self, job_id: str) -> Any:
        """Wait for the job's result; a failed job raises its `ToolboxError`."""

    async def job(self, job_id: str) -> Job | None:
        """The job's record; one whose runner died is failed on the spot (`found_job`)."""
        return await found_job(self.store, job_id)

    async def check(self) -> None:
        """Raise a ToolboxError saying why this backend cannot work at all (a refused credential, an unreachable
        service); `toolbox bot` asks before it connects to Discord."""

    def engine_problem(self) -> str | None:
        """Why the jobs that run models cannot run here (the local backend on a base install), or None."""
        return None

    async def start(self) -> None:
        """Check that the backend can work at all (`check`) before anyone uses it; on the first start after
        an upgrade, give every durable record still only in the live store its file."""
        await self.check()
        copied = await self.store.copy_cached_records()
        if copied:
            log.info("durable records given their files on this first start: %s", ", ".join(copied))

    async def cancel(self, job_id: str) -> None:
        """Backend-specific help in stopping a job; the cooperative cancel flag is set by the caller."""

    async def recover(self) -> None:
        """At the start of a long-running front end (the bot, `toolbox serve`): settle jobs that can no longer
        finish (every dead one is failed). The local backend then removes finished jobs past their retention
        until it closes; on Modal the Dict forgets an entry idle for 7 days, the default retention."""
        await found_jobs(self.store)

    @abstractmethod
    async def service_status(self) -> dict[str, str]:
        """Each service's state as a short phrase (warm, cold, loaded...), for /status."""

    async def close(self) -> None:
        await self.store.close()


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: Settings, engines: EngineFactory = build_engine):
        """`engines` builds each service's engine, from its engine class and this backend's layout."""
        self.store = DurableStore(SqliteStore(settings.state_path), local_homes(settings.data_dir))
        self.layout = Layout(settings.models_dir, settings.loras_dir, self.store)
        self.build_engine = engines
        # The real engines import the ML stack; a factory of its own (a test's stand-ins) may not need it.
        self.missing_libraries = missing_engine_libraries() if engines is build_engine else []
        # One for every service that judges images, loaded when the first job needs it.
        self.classifier = NsfwClassifier(settings.models_dir)
        self.tagger = Tagger(settings.models_dir)
        self._engines: dict[str, Engine] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        # Read here, so that a bad value stops the start-up with one line naming it.
        self.job_retention_seconds = job_retention_seconds()
        self._sweeper: asyncio.Task | None = None

    def engine_problem(self) -> str | None:
        return NO_ENGINES_MESSAGE if self.missing_libraries else None

    async def start(self) -> None:
        await super().start()
        # The files checked against one another and the cache warmed (on Modal, a scheduled function does it daily).
        await reconcile_at_start(self.store)

    async def submit(
        self,
        request: JobRequest,
        owner: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        spec = service_for(request)
        if spec.needs_engine_libraries and self.missing_libraries:
            # Refused before a job exists: there is nothing it could run on.
            raise ToolboxError(ErrorCode.BACKEND_UNAVAILABLE, NO_ENGINES_MESSAGE)
        # A job that could only fail for want of models is refused before it exists, naming them all.
        await asyncio.to_thread(require_models, spec, self._engine_for(spec), request, self.classifier, self.tagger)
        # Named as its runner from the start: queued here, it dies with this process.
        job = await create_job(self.store, request.kind, owner, meta, job_id, runner=holder_record())
        task = asyncio.create_task(self._run(spec, job.id, request.to_payload()), name=f"job-{job.id}")
        self._tasks[job.id] = task
        loop = asyncio.get_running_loop()
        task.add_done_callback(lambda _: loop.call_later(RESULT_KEEP_SECONDS, self._tasks.pop, job.id, None))
        return job

    def _engine_for(self, spec: ServiceSpec) -> Engine:
        """The service's engine (built, not loaded, on first use), with its one worker thread and its turn lock:
        one engine per service, as one Modal container serves all of its class's methods."""
        service = spec.modal_class
        if service not in self._engines:
            self._engines[service] = self.build_engine(spec.engine, self.layout)
            self._executors[service] = ThreadPoolExecutor(1, thread_name_prefix=f"{ENGINE_THREAD_PREFIX}{service}")
            self._turns[service] = asyncio.Lock()
        return self._engines[service]

    async def _run(self, spec: ServiceSpec, job_id: str, payload: dict[str, Any]) -> Any:
        engine, service = self._engine_for(spec), spec.modal_class
        # The job stays "queued" until its engine is free.
        async with self._turns[service]:
            return await run_service_job(self.store, engine, spec, job_id, payload, self._executors[service],
                                         classifier=self.classifier, tagger=self.tagger)

    async def result(self, job_id: str) -> Any:
        task = self._tasks.get(job_id)
        if task is None:
            job = await self.job(job_id)
            raise (job and job.error()) or ToolboxError(
                ErrorCode.INTERNAL, "This job's result is no longer kept by this bot; please run it again."
            )
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._tasks.pop(job_id, None)

    async def service_status(self) -> dict[str, str]:
        return {
            service: "model loaded" if getattr(engine, "loaded", False) else "idle"
            for service, engine in self._engines.items()
        }

    async def recover(self) -> None:
        if self.missing_libraries:
            log.warning("%s; missing: %s", NO_ENGINES_MESSAGE, ", ".join(self.missing_libraries))
        for job in await found_jobs(self.store):
            if not job.status.finished and job.runner is None:
                # Every job this backend queues names its process; one naming none was left by an older version.
                await mark_dead(self.store, job)
        if self._sweeper is None:  # the bot recovers again after each reconnect
            await self._sweep_old_jobs()
            self._sweeper = asyncio.create_task(self._keep_sweeping(), name="job-retention")

    async def _sweep_old_jobs(self) -> None:
        """Finished jobs past their retention removed, with what they keep."""
        try:
            removed = await sweep_finished_jobs(self.store, self.job_retention_seconds)
        except Exception:  # the store busy or failing now: the next round tries again
            log.warning("could not remove old jobs", exc_info=True)
            return
        if removed:
            log.info("removed %s finished past their retention", plural(removed, "job"))

    async def _keep_sweeping(self) -> None:
        while True:
            await asyncio.sleep(JOB_SWEEP_INTERVAL_SECONDS)
            await self._sweep_old_jobs()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for task in self._tasks.values():
            task.cancel()
        # Their last record writes land before the store closes, never over what a next run writes.
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for job_id in list(self._tasks):
            job = await load_job(self.store, job_id)
            if job is not None and not job.status.finished:
                # Nothing will finish it now; this process may live on (the bot's supervisor restarts the bot
                # in it), so its pid would not tell.
                await mark_dead(self.store, job)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        await super().close()


class ModalBackend(Backend):
    name = "modal"

    def __init__(self, settings: Settings):
        self.app_name = settings.modal_app
        self.store = DurableStore(ModalDictStore.from_name(settings.state_dict), volume_homes())

    async def check(self) -> None:
        import modal

        try:
            # Modal's client retries an unreachable server for minutes; a person at a terminal waits seconds.
            async with asyncio.timeout(MODAL_CONNECT_TIMEOUT):
                client = await modal.Client.from_env.aio()
                await client.hello.aio()
        except modal.exception.AuthError:
            raise ToolboxError(
                ErrorCode.PERMISSION_DENIED,
                "Modal has no valid token for this machine: run `modal token new`, or set MODAL_TOKEN_ID and "
                "MODAL_TOKEN_SECRET.",
            ) from None
        except (modal.exception.ConnectionError, OSError, asyncio.TimeoutError) as exc:
            raise ToolboxError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"Modal could not be reached within {MODAL_CONNECT_TIMEOUT:.0f} s ({type(exc).__name__}); "
                "check the network, or use TOOLBOX_BACKEND=local.",
            ) from None

    async def submit(
        self,
        request: JobRequest,
        owner: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        import modal

        spec = service_for(request)
        await self._check_models(request)
        job = await create_job(self.store, request.kind, owner, meta, job_id)
        try:
            service = modal.Cls.from_name(self.app_name, spec.modal_class)()
            call = await getattr(service, spec.method_name).spawn.aio(job.id, request.to_payload())
        except modal.exception.Error as exc:
            log.warning("spawning %s.%s failed: %s", spec.modal_class, spec.method_name, type(exc).__name__)
            # Refused: nothing was started, so nothing of it is kept.
            await forget_job(self.store, job.id)
            raise ToolboxError(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"The Modal app {self.app_name!r} could not be reached. Is it deployed "
                "(`modal deploy -m modal_services.app`)?",
            ) from exc
        # Kept even if this submit is cancelled now: the call runs anyway, and resuming needs its id.
        await asyncio.shield(self.store.put(call_key(job.id), call.object_id))
        return job

    async def service_status(self) -> dict[str, str]:
        import modal

        statuses = {}
        for service in sorted({spec.modal_class for spec in SERVICES.values()}):
            try:
                # A class's containers are those of its service function, "<Class>.*".
                function = modal.Function.from_name(self.app_name, f"{service}.*")
                stats = await function.get_current_stats.aio()
            except modal.exception.Error:
                statuses[service] = "unknown"
                continue
            if stats.num_total_runners:
                statuses[service] = f"warm ({plural(stats.num_total_runners, 'container')}, {stats.backlog} waiting)"
            else:
                statuses[service] = "scaled to zero" + (f" ({stats.backlog} waiting)" if stats.backlog else "")
        return statuses

    async def _check_models(self, request: JobRequest) -> None:
        """Refuse before a GPU container starts only to find its models missing (the NSFW classifier
        only when the request's images are to be classified)."""
        from modal_services.base_models.states import missing_models
        from modal_services.layout import NSFW_CLASSIFIER_DIR
        from modal_services.base_models.registry import BASE_MODELS, models_for
        from modal_services.engines.caption import caption_purpose
        from modal_services.jobs.requests import CaptionRequest

        needed = models_for(caption_purpose(request) if isinstance(request, CaptionRequest) else request.kind)
        if not getattr(getattr(request, "safety", None), "classifies", True):
            needed = [key for key in needed if BASE_MODELS[key].folder != NSFW_CLASSIFIER_DIR]
        missing = await missing_models(self.store, needed)
        if missing:
            names = ", ".join(BASE_MODELS[key].name for key in missing)
            raise ToolboxError(
                ErrorCode.MODELS_MISSING,
                f"Not installed yet: {names}. To install them, {remedies.download(*missing)}.",
            )

    async def cancel(self, job_id: str) -> None:
        import modal

        job = await self.job(job_id)
        call_id = await self.store.get(call_key(job_id))
        if job is not None and job.status is JobStatus.QUEUED and call_id:
            # Not started yet: withdraw the input so no container spins up for it.
            await modal.FunctionCall.from_id(call_id).cancel.aio()

    async def result(self, job_id: str) -> Any:
        import modal

        call_id = await self.store.get(call_key(job_id))
        if call_id is None:
            raise ToolboxError(ErrorCode.INTERNAL, "That job was never started.")
        try:
            return await modal.FunctionCall.from_id(call_id).get.aio()
        except ToolboxError:
            raise
        except modal.exception.InputCancellation:  # a BaseException in modal, not an Error
            raise ToolboxError(ErrorCode.CANCELLED, "This job was cancelled.") from None
        except modal.exception.Error as exc:
            log.warning("job %s: Modal call failed: %s", job_id, type(exc).__name__)
            job = await self.job(job_id)
            if job is not None and job.error() is not None:
                raise job.error() from exc
            raise ToolboxError(ErrorCode.INTERNAL, "The worker running this job stopped unexpectedly.") from exc


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "modal":
        return ModalBackend(settings)
    return LocalBackend(settings)


async def open_backend(settings: Settings) -> Backend:
    """The backend for these settings, checked to work (raises a ToolboxError that says why not)."""
    backend = make_backend(settings)
    try:
        await backend.start()
    except BaseException:
        await backend.close()
        raise
    return backend
