"""headrace producer: submit jobs to the request stream and read their results (protocol v1)."""

from producer.client import AsyncClient, ClientClosedError, JobLostError, ResultTimeoutError
from producer.submission import Submission
from producer.sync import Client
from worker.protocol import Result

__all__ = [
    "AsyncClient",
    "Client",
    "ClientClosedError",
    "JobLostError",
    "Result",
    "ResultTimeoutError",
    "Submission",
]
