"""Typed errors. Each carries a message a user can act on; the CLI prints it as one line."""

from __future__ import annotations


class LiveAvatarError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(LiveAvatarError):
    """A user input is unusable. `subject` names the input (a flag and/or URL), `problem` says why."""

    def __init__(self, subject: str, problem: str):
        super().__init__(f"{subject}: {problem}")
        self.subject = subject
        self.problem = problem

    def __reduce__(self):  # picklable: errors travel from GPU workers through Prefect results
        return (type(self), (self.subject, self.problem))

    def relabel(self, subject: str) -> InputError:
        """The same problem, named as the user gave the input (e.g. '--audio s3://b/k.mp3')."""
        return InputError(subject, self.problem)


class StorageError(LiveAvatarError):
    """Reading or writing a URL failed. Subclasses say whether it is the user's input or transient."""

    def __init__(self, url: str, problem: str):
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.url, self.problem))


class NotFound(StorageError):
    """The object or file does not exist (or its bucket does not)."""


class AccessDenied(StorageError):
    """The store refused us (permissions, credentials)."""


class TransientStorageError(StorageError):
    """A network or service fault that persisted through the storage layer's own retries."""


class MediaError(LiveAvatarError):
    """An external media tool (ffmpeg/PyAV) failed on data we produced (not a user input problem)."""


class OutOfMemory(LiveAvatarError):
    """A generation attempt does not fit: a real CUDA OOM, or an estimate over the memory budget."""

    def __init__(self, message: str, *, needed_bytes: int | None = None, budget_bytes: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls, args, state):
    """Unpickle an exception whose constructor takes keyword-only arguments."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class QCFailed(LiveAvatarError):
    """The finished video failed quality control."""
