"""Python grpcio against the Agora gateway over native gRPC (HTTP/2 cleartext).

Generates the stubs from proto/ with grpcio-tools' bundled protoc into a
temporary folder (never committed), then checks a public unary call, errors
whose google.rpc.BadRequest field violations are read from the status
details (grpc-status-details-bin), NOT_FOUND, and a user call with a token.

Usage:
    .venv/bin/python tests/clients/python/grpc_client.py --gateway 127.0.0.1:8080 [--token JWT]
(AGORA_GATEWAY_ADDR and AGORA_USER_TOKEN work too.) Prints one line per
check; exits 1 with the reason at the first mismatch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

#: Every call gets a deadline, so a hung gateway fails the run instead of stalling it.
TIMEOUT_SECS = 15.0
REPO = Path(__file__).resolve().parents[3]


class Mismatch(Exception):
    """A check that failed: its message says what was expected and what came."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def generate(proto_dir: Path, out: Path) -> None:
    """Python messages and gRPC stubs for every .proto under proto_dir."""
    protos = sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))
    check(bool(protos), f"no .proto files under {proto_dir}")
    # grpcio-tools ships the well-known types (google/protobuf/*.proto) beside protoc.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    code = protoc.main(args)
    check(code == 0, f"protoc failed ({code}): {' '.join(args)}")


def expect_error(what: str, call):
    """Runs call() and returns the grpc.RpcError it must fail with."""
    try:
        value = call()
    except grpc.RpcError as error:
        return error
    raise Mismatch(f"{what}: expected an error, got {value}")


def bad_request_fields(what: str, error: grpc.RpcError) -> list[str]:
    """The field names of the BadRequest violations in the error's status details."""
    status = rpc_status.from_call(error)
    check(
        status is not None,
        f"{what}: no grpc-status-details-bin trailer (code {error.code().name}, "
        f"message {error.details()!r})",
    )
    check(
        status.code == error.code().value[0],
        f"{what}: details say code {status.code}, the call {error.code().name}",
    )
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields.extend(violation.field for violation in bad_request.field_violations)
    check(
        bool(fields),
        f"{what}: no google.rpc.BadRequest among the details "
        f"{[detail.type_url for detail in status.details]}",
    )
    return fields


def run(gateway: str, token: str | None) -> None:
    catalog_pb2 = importlib.import_module("agora.catalog.v1.catalog_pb2")
    catalog_grpc = importlib.import_module("agora.catalog.v1.catalog_pb2_grpc")
    users_pb2 = importlib.import_module("agora.users.v1.users_pb2")
    users_grpc = importlib.import_module("agora.users.v1.users_pb2_grpc")
    orders_pb2 = importlib.import_module("agora.orders.v1.orders_pb2")
    orders_grpc = importlib.import_module("agora.orders.v1.orders_pb2_grpc")

    with grpc.insecure_channel(gateway) as channel:
        catalog = catalog_grpc.CatalogServiceStub(channel)
        users = users_grpc.UserServiceStub(channel)
        orders = orders_grpc.OrderServiceStub(channel)

        page = catalog.ListProducts(
            catalog_pb2.ListProductsRequest(page_size=2), timeout=TIMEOUT_SECS
        )
        check(
            1 <= len(page.products) <= 2,
            f"ListProducts(page_size=2) returned {len(page.products)} products "
            "(seeded catalog: expected 1 or 2)",
        )
        print(f"ListProducts(page_size=2): {', '.join(p.name for p in page.products)}")

        # Every field invalid at once: one violation per field.
        error = expect_error(
            "CreateUser with an invalid email, name and password",
            lambda: users.CreateUser(
                users_pb2.CreateUserRequest(email="not-an-email", name="", password="short"),
                timeout=TIMEOUT_SECS,
            ),
        )
        check(
            error.code() == grpc.StatusCode.INVALID_ARGUMENT,
            f"CreateUser with invalid fields: expected INVALID_ARGUMENT, got "
            f"{error.code().name}: {error.details()}",
        )
        fields = bad_request_fields("CreateUser with invalid fields", error)
        check(
            sorted(fields) == ["email", "name", "password"],
            f"CreateUser with invalid fields: BadRequest violations for {fields}, "
            "expected email, name and password",
        )
        print(f"CreateUser(invalid): INVALID_ARGUMENT, BadRequest fields {sorted(fields)}")

        error = expect_error(
            "GetProduct with a malformed id",
            lambda: catalog.GetProduct(
                catalog_pb2.GetProductRequest(id="not-a-product-id"), timeout=TIMEOUT_SECS
            ),
        )
        check(
            error.code() == grpc.StatusCode.INVALID_ARGUMENT,
            f"GetProduct(malformed id): expected INVALID_ARGUMENT, got "
            f"{error.code().name}: {error.details()}",
        )
        fields = bad_request_fields("GetProduct(malformed id)", error)
        check(fields == ["id"], f"GetProduct(malformed id): BadRequest fields {fields}, expected [id]")
        print(f"GetProduct(malformed id): INVALID_ARGUMENT, BadRequest fields {fields}")

        unknown = str(uuid.uuid4())
        error = expect_error(
            f"GetProduct({unknown})",
            lambda: catalog.GetProduct(
                catalog_pb2.GetProductRequest(id=unknown), timeout=TIMEOUT_SECS
            ),
        )
        check(
            error.code() == grpc.StatusCode.NOT_FOUND,
            f"GetProduct(unknown id): expected NOT_FOUND, got {error.code().name}: {error.details()}",
        )
        print(f"GetProduct(unknown id): NOT_FOUND {error.details()!r}")

        error = expect_error(
            "ListOrders without a token",
            lambda: orders.ListOrders(orders_pb2.ListOrdersRequest(), timeout=TIMEOUT_SECS),
        )
        check(
            error.code() == grpc.StatusCode.UNAUTHENTICATED,
            f"ListOrders without a token: expected UNAUTHENTICATED, got "
            f"{error.code().name}: {error.details()}",
        )
        print("ListOrders without a token: UNAUTHENTICATED")

        if token:
            listed = orders.ListOrders(
                orders_pb2.ListOrdersRequest(page_size=5),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=TIMEOUT_SECS,
            )
            print(f"ListOrders with a token: {len(listed.orders)} orders")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default=os.environ.get("AGORA_GATEWAY_ADDR"),
                        help="host:port of the gateway (native gRPC, cleartext)")
    parser.add_argument("--token", default=os.environ.get("AGORA_USER_TOKEN"),
                        help="a user's access token, for the user calls")
    parser.add_argument("--proto-dir", type=Path, default=REPO / "proto")
    args = parser.parse_args()
    try:
        check(bool(args.gateway), "no gateway address: pass --gateway or set AGORA_GATEWAY_ADDR")
        with tempfile.TemporaryDirectory(prefix="agora-py-stubs-") as out:
            generate(args.proto_dir, Path(out))
            sys.path.insert(0, out)
            run(args.gateway, args.token)
    except Mismatch as mismatch:
        print(f"python client FAILED: {mismatch}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(
            f"python client FAILED: unexpected {error.code().name}: {error.details()}",
            file=sys.stderr,
        )
        return 1
    print("python client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
