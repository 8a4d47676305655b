"""Every key of the shared state store, minted here: one key per thing.

Live keys (harmless to lose when idle; the Dict forgets them after 7 idle days):
  per job (removed with the job record, see `forget_job`): `job:<id>` the
  record, `call:<id>` its Modal FunctionCall id, `cancel:<id>` a stop request,
  `preview:<id>` the latest preview; `download:<model>` a base model's download
  progress; `lock:<name>` one holder at a time (`lock:download:<model>`,
  `lock:civitai:<version>`, `lock:file:<name>`, `lock:settings:<guild>`,
  `lock:setup-download`);
  `migration:file:<name>` where the migration moves an old file (removed when
  it finishes); job slots (`slots.py`): `slot:<scope>:<n>` the n-th slot of a
  cap (`user:<id>`, `guild:<id>`, `global`), `slot-retired:<holder>:<slot key>`
  who may act on a holder's slot; `reconcile:last` the last reconcile's report
  (`reconcile.py`: what it checked, and the drift it found).
Durable records (each a file, the store only caches it; `durable.py` says where):
  `model:<file>` a library entry, `manifest:<model>` what was verified of a
  base model, `optional:<model>` who enabled an optional base model, and when,
  `active_checkpoint`, `settings:<guild>`, `secret:<service>` a token; what
  result buttons reuse: `upscale:<id>` and `generate:<id>` a job's parameters,
  `generate-faces:<id>` a face generation's photos (for V and Reroll),
  `caption-prompt:<id>` a prompt-style caption for its Generate button, `image-info:<id>` the settings
  Image info read from an image, for its Generate with these settings button.
"""

from __future__ import annotations

from modal_services.state.store import StateStore

JOB_PREFIX = "job:"
ENTRY_PREFIX = "model:"
ACTIVE_CHECKPOINT_KEY = "active_checkpoint"
# Keys that belong to one job, each `<prefix><job id>`.
PER_JOB_PREFIXES = (JOB_PREFIX, "call:", "cancel:", "preview:")
# What a finished job's result buttons reuse, each `<prefix><job id>`: durable records with a
# retention of their own (`bot/result_params.py`), outliving the job record.
RESULT_PARAMS_PREFIXES = ("upscale:", "generate:", "generate-faces:", "caption-prompt:", "image-info:")


# The last reconcile of the durable records with their files: when it ran, what it found.
RECONCILE_KEY = "reconcile:last"

SLOT_PREFIX = "slot:"
RETIRED_SLOT_PREFIX = "slot-retired:"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def call_key(job_id: str) -> str:
    """Where the Modal FunctionCall id of a job is kept (apart from the record the worker writes)."""
    return f"call:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set by whoever asks a job to stop; the worker polls it (a key apart, so no write races the worker's)."""
    return f"cancel:{job_id}"


def preview_key(job_id: str) -> str:
    return f"preview:{job_id}"


def upscale_params_key(job_id: str) -> str:
    """An upscale's settings, for the buttons under its result (Upscale 2x again, Vary seed)."""
    return f"upscale:{job_id}"


def generate_params_key(job_id: str) -> str:
    """A generation's settings, for the buttons under its result (U, V, Reroll)."""
    return f"generate:{job_id}"


def generate_faces_key(job_id: str) -> str:
    """A face generation's photos (base64 PNGs), so that its V and Reroll buttons keep the face."""
    return f"generate-faces:{job_id}"


def caption_prompt_key(job_id: str) -> str:
    """A `prompt`-style caption, for its Generate from this button."""
    return f"caption-prompt:{job_id}"


def image_info_key(reading_id: str) -> str:
    """The settings Image info read from an image, for its Generate with these settings button."""
    return f"image-info:{reading_id}"


def download_key(model: str) -> str:
    return f"download:{model}"


def manifest_key(model: str) -> str:
    return f"manifest:{model}"


def optional_model_key(model: str) -> str:
    """Present while an admin has an optional base model enabled: who did, and when."""
    return f"optional:{model}"


def lock_key(name: str) -> str:
    return f"lock:{name}"


def civitai_lock_name(version_id: int) -> str:
    """The lock one import of a CivitAI model version holds."""
    return f"civitai:{version_id}"


def file_lock_name(file_name: str) -> str:
    """The lock an import holds on a library file name while it picks it, moves the file in and writes the entry."""
    return f"file:{file_name.lower()}"


# The lock that makes one setup download at a time; it holds that download's job id.
SETUP_DOWNLOAD_LOCK = "setup-download"


def entry_key(file: str) -> str:
    return ENTRY_PREFIX + file


# Where the migration from the older toolbox's layout noted each file's new place before moving it.
MIGRATION_JOURNAL_PREFIX = "migration:file:"


def migration_journal_key(old_name: str) -> str:
    return MIGRATION_JOURNAL_PREFIX + old_name


def settings_key(guild_id: int | None) -> str:
    return f"settings:{guild_id or 'dm'}"


def settings_lock_name(guild_id: int | None) -> str:
    """The lock held while one server's settings are read, changed and written back (named as their record)."""
    return settings_key(guild_id)


def secret_key(service: str) -> str:
    return f"secret:{service}"


async def forget_job(store: StateStore, job_id: str) -> None:
    """The retention rule: a job's record goes together with every key that belongs to it."""
    for prefix in PER_JOB_PREFIXES:
        await store.pop(prefix + job_id)


def slot_key(scope: str, number: int) -> str:
    return f"{SLOT_PREFIX}{scope}:{number}"


def retired_slot_key(holder: str, slot: str) -> str:
    return f"{RETIRED_SLOT_PREFIX}{holder}:{slot}"
