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
    (Istio drops all its defaults once one resource annotation is set). Quantities may be written
    as strings (``100m``, ``1Gi``) or, as Kubernetes accepts them, as numbers (``1``, ``1073741824``).
    The memory request may not exceed the memory limit (the API server refuses such a pod)."""

    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    memory_limit: str = "1024Mi"

    @field_validator("cpu_request", mode="before")
    @classmethod
    def _cpu(cls, v: object) -> str:
        return format_cpu(parse_cpu(v))

    @field_validator("memory_request", "memory_limit", mode="before")
    @classmethod
    def _mem(cls, v: object) -> str:
        parse_memory(v)
        return str(v)

    @model_validator(mode="after")
    def _request_within_limit(self) -> SidecarResources:
        if parse_memory(self.memory_request) > parse_memory(self.memory_limit):
            raise ValueError(f"memoryRequest <= memoryLimit must hold (Kubernetes refuses a request above "
                             f"its limit), got memoryRequest={self.memory_request}, "
                             f"memoryLimit={self.memory_limit}")
        return self

    @property
    def cpu_request_cores(self) -> float:
        return parse_cpu(self.cpu_request)
