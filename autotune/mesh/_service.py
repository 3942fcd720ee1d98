"""The service whose client sidecars are tuned, and the sidecar resources written with the CPU limit."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from autotune.mesh._quantity import format_cpu, parse_cpu, parse_memory


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class ServiceRef(_Model):
    """The service whose client sidecars are tuned; names appear in the generated manifests."""

    name: str = "backend"
    namespace: str = "staging"
    host: str = ""
    port: int = Field(default=8080, ge=1, le=65535)
    destination_rule: str | None = None

    @model_validator(mode="after")
    def _default_host(self) -> ServiceRef:
        if not self.host:
            object.__setattr__(self, "host", f"{self.name}.{self.namespace}.svc.cluster.local")
        return self


class SidecarResources(_Model):
    """The sidecar resources that are not tuned but must be written with the CPU limit
    (Istio drops all its defaults once one resource annotation is set)."""

    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    memory_limit: str = "1024Mi"

    @field_validator("cpu_request")
    @classmethod
    def _cpu(cls, v: str) -> str:
        return format_cpu(parse_cpu(v))

    @field_validator("memory_request", "memory_limit")
    @classmethod
    def _mem(cls, v: str) -> str:
        parse_memory(v)
        return v

    @property
    def cpu_request_cores(self) -> float:
        return parse_cpu(self.cpu_request)
