"""The controller's exception hierarchy."""


class ControllerError(Exception):
    """Base class for controller errors; messages say what was wrong and what to do."""


class SettingsError(ControllerError):
    """The controller's settings are invalid or unsafe."""


class BrokerError(ControllerError):
    """The embedded broker could not be started or reached."""


class DataDirBusy(ControllerError):
    """Another controller process holds the data directory."""
