"""The model-repository extension over gRPC: ``RepositoryIndex``, ``RepositoryModelLoad``
and ``RepositoryModelUnload``, answering as ``/v2/repository/...`` does over HTTP
(:mod:`service.routes.repository`): the same work (:class:`service.repository.ModelRepository`),
the same errors with their ``grpc_code`` (``PERMISSION_DENIED`` while ``MODEL_REPOSITORY``
is unset, ``INVALID_ARGUMENT`` for a refused load, ``ABORTED`` for a load while another
runs, ``DEADLINE_EXCEEDED`` past ``LOAD_TIMEOUT_S``), behind the admin key
(``ADMIN_API_KEY``, else ``API_KEY``), which :class:`service.grpc_server.ApiKeyInterceptor`
checks before the message is read.

A load takes a ``path`` string parameter (a file in the repository, as HTTP's body does);
Triton's ``config`` and ``file:...`` parameters (tritonclient's ``load_model(config=,
files=)``) are refused naming them, and nothing sent is written. chanseg has one
repository: a ``repository_name`` other than empty is refused.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Dict

from tritonclient.grpc import service_pb2 as pb

from .errors import InvalidRequest
from .pipeline import pool_call
from .repository import load_path

__all__ = ["ADMIN_METHODS", "repository_calls"]

ADMIN_METHODS = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})


def repository_calls(service) -> Dict[str, Callable[..., Awaitable[bytes]]]:
    """The three calls of ``service`` (an :class:`~service.grpc_server.InferenceService`),
    each ``fn(rpc, context, method) -> response bytes``."""
    state = service.state

    async def index(rpc, context, method) -> bytes:
        request = await service._parse(pb.RepositoryIndexRequest, rpc, context)
        _one_repository(request.repository_name)
        rows = await pool_call(state, state.repository.index)
        model = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                model(name=r["name"], version=r["version"], state=r["state"], reason=r["reason"])
                for r in rows
                if not request.ready or r["state"] == "READY"
            ]
        ).SerializeToString()

    async def load(rpc, context, method) -> bytes:
        request = await service._parse(pb.RepositoryModelLoadRequest, rpc, context)
        _one_repository(request.repository_name)
        parameters = {key: _value(p) for key, p in request.parameters.items()}
        given = load_path(parameters)
        target = await pool_call(state, state.repository.find, request.model_name, given)
        await state.repository.load(target)
        return pb.RepositoryModelLoadResponse().SerializeToString()

    async def unload(rpc, context, method) -> bytes:
        request = await service._parse(pb.RepositoryModelUnloadRequest, rpc, context)
        _one_repository(request.repository_name)
        await state.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse().SerializeToString()

    return {"RepositoryIndex": index, "RepositoryModelLoad": load, "RepositoryModelUnload": unload}


def _value(parameter) -> object:
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind is not None else None


def _one_repository(name: str) -> None:
    if name:
        raise InvalidRequest(
            f"repository_name '{name[:100]}': chanseg has one model repository (MODEL_REPOSITORY); leave it empty"
        )
