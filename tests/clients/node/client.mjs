// connect-es against the Agora gateway, over each transport a browser or a
// Node program would use: grpc-web (binary) and the Connect protocol (JSON
// and binary). For each one: a unary call, a unary error, a call that needs
// a user token, and OrderService.WatchOrder read to its terminal status.
//
// Usage (generated code in ./gen first, or in AGORA_ES_GEN_DIR: see
// buf.gen.yaml):
//   AGORA_GATEWAY_URL=http://127.0.0.1:8080 AGORA_USER_TOKEN=<jwt> \
//   AGORA_PRODUCT_ID=<a product with a few units in stock> node client.mjs
// Optional: AGORA_TRANSPORTS=grpc-web,connect-json,connect-proto,grpc (the
// default); AGORA_ORDERS_URL, to call OrderService somewhere else than
// AGORA_GATEWAY_URL (only for trying the script on the services' own ports,
// with AGORA_TRANSPORTS=grpc).
//
// Prints one line per check; exits 1 with the reason at the first mismatch.

import { randomUUID } from "node:crypto";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";

/** Where protoc-gen-es wrote the code: a folder under this one, so that its
 * imports of @bufbuild/protobuf resolve to this folder's node_modules. */
const GENERATED = path.resolve(
  process.env.AGORA_ES_GEN_DIR || path.join(path.dirname(fileURLToPath(import.meta.url)), "gen"),
);

/** The test card that always goes through (shared/CONTRACT.md). */
const GOOD_CARD = "4242424242424242";
/** Every call gets a deadline, so a hung gateway fails the run instead of stalling it. */
const TIMEOUT_MS = 15_000;

class Mismatch extends Error {}

/** Imports one generated module, e.g. "agora/catalog/v1/catalog_pb.js". */
async function generated(module) {
  const file = path.join(GENERATED, module);
  try {
    return await import(pathToFileURL(file).href);
  } catch (error) {
    throw new Mismatch(`cannot load the generated ${file} (run buf generate, see buf.gen.yaml): ${error.message}`);
  }
}

const { CatalogService } = await generated("agora/catalog/v1/catalog_pb.js").catch(fail);
const { OrderService, OrderStatus } = await generated("agora/orders/v1/orders_pb.js").catch(fail);

function check(condition, message) {
  if (!condition) {
    throw new Mismatch(message);
  }
}

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Mismatch(`environment variable ${name} is not set`);
  }
  return value;
}

/** Awaits `call` and returns the ConnectError it must fail with. */
async function expectError(what, call) {
  try {
    const value = await call();
    throw new Mismatch(`${what}: expected an error, got ${JSON.stringify(value)}`);
  } catch (error) {
    if (error instanceof Mismatch) {
      throw error;
    }
    return ConnectError.from(error);
  }
}

/** Transport name -> a function of the base URL making it. */
const TRANSPORTS = {
  // HTTP/1.1, as a browser's fetch to a plain-HTTP origin would be.
  "grpc-web": (baseUrl) => createGrpcWebTransport({ baseUrl, httpVersion: "1.1" }),
  "connect-json": (baseUrl) => createConnectTransport({ baseUrl, httpVersion: "1.1" }),
  "connect-proto": (baseUrl) =>
    createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true }),
  // Native gRPC needs HTTP/2 (cleartext, prior knowledge).
  grpc: (baseUrl) => createGrpcTransport({ baseUrl }),
};

function transportNames() {
  const names = (process.env.AGORA_TRANSPORTS || Object.keys(TRANSPORTS).join(","))
    .split(",")
    .map((name) => name.trim())
    .filter((name) => name.length > 0);
  for (const name of names) {
    check(name in TRANSPORTS, `unknown transport ${name} (known: ${Object.keys(TRANSPORTS).join(", ")})`);
  }
  return names;
}

async function exercise(name, gatewayUrl, ordersUrl, token, productId) {
  const say = (line) => console.log(`[${name}] ${line}`);
  const catalog = createClient(CatalogService, TRANSPORTS[name](gatewayUrl));
  const orders = createClient(OrderService, TRANSPORTS[name](ordersUrl));
  const options = { timeoutMs: TIMEOUT_MS };
  const asUser = { timeoutMs: TIMEOUT_MS, headers: { authorization: `Bearer ${token}` } };

  // Unary, public.
  const page = await catalog.listProducts({ pageSize: 2 }, options);
  check(
    page.products.length >= 1 && page.products.length <= 2,
    `ListProducts{page_size: 2} returned ${page.products.length} products (seeded catalog: expected 1 or 2)`,
  );
  check(page.nextPageToken !== "", "ListProducts{page_size: 2} of the seeded catalog has no next_page_token");
  const first = page.products[0];
  say(`ListProducts{page_size: 2}: ${page.products.map((p) => p.name).join(", ")}`);

  const got = await catalog.getProduct({ id: first.id }, options);
  check(got.product?.id === first.id, `GetProduct(${first.id}) returned ${got.product?.id}`);
  check(got.product?.name === first.name, `GetProduct(${first.id}) name ${got.product?.name} != ${first.name}`);
  check(
    got.product?.price?.amountMinor === first.price?.amountMinor &&
      got.product?.price?.currencyCode === first.price?.currencyCode,
    `GetProduct(${first.id}) price differs from ListProducts'`,
  );
  say(`GetProduct(${first.id}): ${got.product.name}, ${got.product.price.amountMinor} ${got.product.price.currencyCode}`);

  const toOrder = (await catalog.getProduct({ id: productId }, options)).product;
  check(toOrder?.id === productId, `GetProduct(${productId}) returned ${toOrder?.id}`);

  // Unary error from the backend.
  const unknown = randomUUID();
  const notFound = await expectError(`GetProduct(${unknown})`, () =>
    catalog.getProduct({ id: unknown }, options),
  );
  check(
    notFound.code === Code.NotFound,
    `GetProduct(${unknown}): expected NotFound, got ${Code[notFound.code]}: ${notFound.rawMessage}`,
  );
  say(`GetProduct(unknown id): ${Code[notFound.code]} "${notFound.rawMessage}"`);

  // A user RPC without a token.
  const anonymous = await expectError("ListOrders without a token", () =>
    orders.listOrders({ pageSize: 1 }, options),
  );
  check(
    anonymous.code === Code.Unauthenticated,
    `ListOrders without a token: expected Unauthenticated, got ${Code[anonymous.code]}: ${anonymous.rawMessage}`,
  );
  say(`ListOrders without a token: ${Code[anonymous.code]}`);

  // A user RPC with one: the checkout saga through the gateway.
  const placed = await orders.placeOrder(
    {
      requestId: `gateway-clients-${name}-${randomUUID()}`,
      items: [{ productId, quantity: 1n }],
      cardNumber: GOOD_CARD,
    },
    asUser,
  );
  const order = placed.order;
  check(order !== undefined && order.id !== "", "PlaceOrder returned no order");
  check(
    order.items.length === 1 && order.items[0].productId === productId,
    `PlaceOrder: order ${order.id} has items ${JSON.stringify(order.items.map((i) => i.productId))}`,
  );
  check(
    order.total?.amountMinor === toOrder.price?.amountMinor,
    `PlaceOrder: total ${order.total?.amountMinor} for one ${toOrder.name} at ${toOrder.price?.amountMinor}`,
  );
  say(`PlaceOrder(1 x ${toOrder.name}): order ${order.id} ${OrderStatus[order.status]}`);

  // Server streaming to a terminal status, then the end of the stream.
  const statuses = [];
  for await (const update of orders.watchOrder({ id: order.id }, asUser)) {
    check(update.order?.id === order.id, `WatchOrder(${order.id}) sent order ${update.order?.id}`);
    statuses.push(update.order.status);
  }
  const names = statuses.map((status) => OrderStatus[status]);
  check(statuses.length >= 1, `WatchOrder(${order.id}) ended without a message`);
  check(
    statuses[statuses.length - 1] === OrderStatus.COMPLETED,
    `WatchOrder(${order.id}) ended at ${names[names.length - 1]}, expected COMPLETED (saw ${names.join(" -> ")})`,
  );
  check(
    statuses.slice(0, -1).every((status) => status === OrderStatus.PENDING),
    `WatchOrder(${order.id}) sent a terminal status before the last message: ${names.join(" -> ")}`,
  );
  say(`WatchOrder(${order.id}): ${names.join(" -> ")}, then the stream ended`);

  // A streaming call refused before any message (a trailers-only reply).
  const refused = await expectError(`WatchOrder(${order.id}) without a token`, async () => {
    const seen = [];
    for await (const update of orders.watchOrder({ id: order.id }, options)) {
      seen.push(update);
    }
    return seen;
  });
  check(
    refused.code === Code.Unauthenticated,
    `WatchOrder without a token: expected Unauthenticated, got ${Code[refused.code]}: ${refused.rawMessage}`,
  );
  say(`WatchOrder without a token: ${Code[refused.code]}`);
}

async function main() {
  const gatewayUrl = required("AGORA_GATEWAY_URL");
  const ordersUrl = process.env.AGORA_ORDERS_URL || gatewayUrl;
  const token = required("AGORA_USER_TOKEN");
  const productId = required("AGORA_PRODUCT_ID");
  for (const name of transportNames()) {
    try {
      await exercise(name, gatewayUrl, ordersUrl, token, productId);
    } catch (error) {
      const reason =
        error instanceof Mismatch
          ? error.message
          : error instanceof ConnectError
            ? `unexpected error ${Code[error.code]}: ${error.rawMessage}`
            : (error?.stack ?? String(error));
      throw new Mismatch(`[${name}] ${reason}`);
    }
  }
  console.log("node client: all checks passed");
}

function fail(error) {
  console.error(`node client FAILED: ${error instanceof Mismatch ? error.message : (error?.stack ?? error)}`);
  process.exit(1);
}

main().catch(fail);
