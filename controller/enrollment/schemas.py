"""What an admin asks for when creating an enrollment token: one model for the REST API and the dashboard form."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from wire.messages import Labels

#: the longest lifetime a token may be given (a year)
MAX_HOURS = 24 * 365

DeviceIdStr = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
]


class EnrollmentTokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    expires_in_hours: float | None = Field(
        None, gt=0, le=MAX_HOURS, description="lifetime; omit: the controller's enrollment_token_hours (24)"
    )
    labels: Labels = Field(default_factory=dict, description="labels the enrolled device gets")
    device_id: DeviceIdStr | None = Field(
        None, description="bind the token to this device id (also re-enrolls an enrolled device: new credentials)"
    )
    note: Annotated[str, StringConstraints(max_length=256)] = Field("", description="for whom or what it is")

    def lifetime(self, default_hours: float) -> timedelta:
        """How long the token lives: what was asked for, else the controller's default."""
        return timedelta(hours=self.expires_in_hours or default_hours)


def enroll_command(controller_url: str) -> str:
    """What to run on the device (the token in a file: a command line is visible to other users)."""
    return f"slmfleet agent enroll --controller {controller_url} --token-file TOKEN_FILE"


def controller_url(public_url: str | None, request_base_url: str) -> str:
    """The controller's URL as devices reach it: ``public_url`` if set, else the address the request came to."""
    return public_url or request_base_url.rstrip("/")
