"""gRPC server reflection, v1 and v1alpha, serving lossd's contract with its comments.

grpcio-reflection serves files as the Python descriptor pool knows them: under the generated
module's import name (``lossd/client/_proto/lossd.proto``) and without source info, so
``grpcurl describe`` shows no documentation and asking for ``lossd/v1/lossd.proto`` fails.
This servicer answers from ``proto/generate.py``'s descriptor set instead, which keeps the
source name and every comment. The two protocol versions are the same messages under two
package names, so one handler serves both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as rpb

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
DESCRIPTOR_SET = "lossd_v1_descriptor.binpb"  # written by proto/generate.py beside the code


def _v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1's file: v1alpha's messages and service under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(rpb.DESCRIPTOR.serialized_pb)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", new
    for message in proto.message_type:
        for item in message.field:
            if item.type_name.startswith(f".{old}."):
                item.type_name = f".{new}." + item.type_name.removeprefix(f".{old}.")
    for service in proto.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                value = getattr(method, attr)
                setattr(method, attr, f".{new}." + value.removeprefix(f".{old}."))
    return proto


def _symbols(proto: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    prefix = f"{proto.package}." if proto.package else ""

    def messages(items: Iterable[descriptor_pb2.DescriptorProto], scope: str) -> Iterator[str]:
        for message in items:
            name = f"{scope}{message.name}"
            yield name
            yield from (f"{name}.{enum.name}" for enum in message.enum_type)
            yield from messages(message.nested_type, f"{name}.")

    yield from messages(proto.message_type, prefix)
    yield from (f"{prefix}{enum.name}" for enum in proto.enum_type)
    for service in proto.service:
        yield f"{prefix}{service.name}"
        yield from (f"{prefix}{service.name}.{method.name}" for method in service.method)


class ReflectionServicer:
    """Answers ServerReflectionInfo from serialized FileDescriptorProtos (none has imports)."""

    def __init__(self, service_names: Iterable[str]) -> None:
        lossd_set = descriptor_pb2.FileDescriptorSet.FromString(
            resources.files("lossd.client._proto").joinpath(DESCRIPTOR_SET).read_bytes()
        )
        files = [
            *lossd_set.file,
            descriptor_pb2.FileDescriptorProto.FromString(health_pb2.DESCRIPTOR.serialized_pb),
            descriptor_pb2.FileDescriptorProto.FromString(rpb.DESCRIPTOR.serialized_pb),
            _v1_reflection_file(),
        ]
        self.files = {f.name: f.SerializeToString() for f in files}
        self.by_symbol = {symbol: f.name for f in files for symbol in _symbols(f)}
        self.services = sorted(service_names)

    def _answer(self, request: rpb.ServerReflectionRequest) -> rpb.ServerReflectionResponse:
        response = rpb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        name = None
        if kind == "file_by_filename":
            name = request.file_by_filename if request.file_by_filename in self.files else None
        elif kind == "file_containing_symbol":
            name = self.by_symbol.get(request.file_containing_symbol)
        elif kind == "list_services":
            response.list_services_response.service.extend(
                rpb.ServiceResponse(name=s) for s in self.services
            )
            return response
        if name is None:  # also every extension query: this contract has no extensions
            response.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
            response.error_response.error_message = f"{kind} not found"
            return response
        response.file_descriptor_response.file_descriptor_proto.append(self.files[name])
        return response

    def ServerReflectionInfo(
        self, request_iterator: Iterator[rpb.ServerReflectionRequest], context: grpc.ServicerContext
    ) -> Iterator[rpb.ServerReflectionResponse]:
        for request in request_iterator:
            yield self._answer(request)


def enable(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (both versions) listing ``service_names`` and the two reflection services."""
    servicer = ReflectionServicer([*service_names, V1, V1ALPHA])
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1, V1ALPHA)
        ]
    )
