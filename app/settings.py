"""Every setting of the service, read from QUILL_* environment variables (or `python -m app` flags)."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUILL_", env_file=".env", extra="ignore")

    # Run directories or .safetensors files; the first is the default model. Empty: every run under checkpoints/,
    # the bundled GPT the default
    checkpoints: Annotated[list[str], NoDecode] = []
    # the served model a request without `model` gets, by name (it is listed first); unset: as above
    default_model: str | None = None
    device: str = "auto"  # auto: cuda, then mps, then cpu (model/device.py)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # torch's threads for each engine; 0: one per core for a model of 5M parameters or more, else one per core
    # but one, which is left to the server's own per-token work (app/registry.py, engine_threads)
    torch_threads: int = Field(0, ge=0)
    # compile each GPT's decode step (AOTInductor, model/compiled.py; needs a C++ compiler) in the background
    # while serving eagerly, switching to each batch size's step once it is built: about twice the tokens/s at
    # batch 1; later starts load the kept packages in seconds; without a compiler, or if compiling fails, it
    # serves eagerly (one line in the log says why); 0: never compile
    compile: bool = True
    # where compiled steps are kept; unset: $XDG_CACHE_HOME/quill/compiled, else ~/.cache/quill/compiled
    compile_cache: Path | None = None
    # a prompt starts from the keys and values of its longest prefix that a cache row holds (a running or
    # finished request's, or one that prompts admitted together share), copied, not computed; 0: never
    prefix_cache: bool = True
    # run each model's engine in a child process of its own, so that its Python and the event loop's never
    # wait on one GIL (vLLM's split): 1.4x the tokens/s with 32 streams here; the child loads the weights
    # again (this process keeps a copy in CPU memory for the model card); 0: in a thread of this process
    engine_process: bool = True
    # an engine process that sends nothing for this many seconds while work waits on it is hung: it is killed and
    # replaced (model/engine_process.py). Its longest legitimate silence is one forward of a whole context (a
    # prefill group, a scoring window): 15 s for GPT-2 medium's shape on 2 busy CPU cores, milliseconds for the
    # bundled models; 120 covers GPT-2 XL's there. Raise it for a larger model on a slow CPU
    engine_timeout: float = Field(120.0, gt=0)
    # the weights' precision for serving, cast once at load; auto: bfloat16 on a CUDA GPU of compute capability
    # 8.0 or more (model/device.py), else float32 (on this 2-core CPU bfloat16 changed decode speed little:
    # docs/benchmarks-peers.md)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # int8: store each GPT's linear layers' weights as int8 with a scale per output channel (weight-only,
    # model/quantize.py), after the dtype cast: a quarter of float32's bytes a step reads, and 1.7x the compiled
    # batch-1 decode speed of GPT-2 small's shape here (docs/bench-int8-decode.md); none (or unset): as dtype
    quantize: Literal["none", "int8"] | None = None
    max_running: int = Field(32, ge=1)  # requests decoded together, per model (the batch size)
    max_queued: int = Field(64, ge=0)  # requests waiting for a slot, per model; beyond: 429
    max_body_bytes: int = Field(256 * 1024, ge=1024)  # larger request bodies get 413
    max_headers: int = Field(100, ge=10)  # requests with more headers get 431 (Apache's limit)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # ... or with more bytes of them (Node's limit)
    send_timeout: float = Field(30.0, gt=0)  # a client that reads nothing for this long is cut off
    drain_timeout: float = Field(30.0, ge=0)  # on Ctrl-C or SIGTERM (python -m app), how long streams may finish
    api_key: SecretStr | None = None  # when set, every route but /health, /ready and the playground page needs it
    cors_origins: Annotated[list[str], NoDecode] = []  # closed unless listed

    @field_validator("checkpoints", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, v):
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v
