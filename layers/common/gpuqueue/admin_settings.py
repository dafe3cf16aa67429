"""Typed configuration of the admin function (read once per container by its cached getter)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# A row not checked for this many health-check periods counts as unhealthy (as in dispatch).
HEALTH_MAX_AGE_PERIODS = 3


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    endpoints_table: str
    # A float: the local stack compresses the period along with its schedules (e.g. 1.5 s).
    health_check_period_seconds: float = Field(default=30, gt=0)
    # Where endpoints' credential references may point (checked, never read, here).
    gpu_secret_prefix: str | None = None
    gpu_parameter_prefix: str | None = None

    @property
    def health_max_age_seconds(self) -> float:
        return HEALTH_MAX_AGE_PERIODS * self.health_check_period_seconds
