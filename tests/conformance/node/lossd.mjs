// A small lossd client for Node.js, written from proto/lossd/v1/lossd.proto alone: what a user in
// another language would write. The conformance tests beside it drive a running server with it.
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { createRequire } from "node:module";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..", "..");
const require = createRequire(import.meta.url);

// lossd's contract: only the repository's proto/ directory.
const definition = protoLoader.loadSync("lossd/v1/lossd.proto", {
  includeDirs: [path.join(repo, "proto")],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
export const lossd = grpc.loadPackageDefinition(definition).lossd.v1;

// Standard messages (health, reflection, google.rpc) from the npm packages that publish their
// .proto files, and descriptor.proto, read with protobufjs.
const standardProtos = {
  "grpc/health/v1/health.proto": "grpc-health-check/proto/health/v1/health.proto",
  "grpc/reflection/v1/reflection.proto": "@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto",
  "grpc/reflection/v1alpha/reflection.proto":
    "@grpc/reflection/build/proto/grpc/reflection/v1alpha/reflection.proto",
  "google/rpc/status.proto": "google-proto-files/google/rpc/status.proto",
  "google/rpc/error_details.proto": "google-proto-files/google/rpc/error_details.proto",
};
const standard = new protobuf.Root();
// Imports between them (google/protobuf/any.proto, ...) are protobufjs's bundled common types.
standard.resolvePath = (origin, target) =>
  standardProtos[target] ? require.resolve(standardProtos[target]) : protobuf.util.path.resolve(origin, target);
standard.loadSync(Object.keys(standardProtos), { keepCase: true });
export const std = (name) => standard.lookupType(name);
const descriptorRoot = protobuf.loadSync(
  require.resolve("protobufjs/google/protobuf/descriptor.proto"),
);
export const FileDescriptorProto = descriptorRoot.lookupType("google.protobuf.FileDescriptorProto");

export const endpoint = process.env.LOSSD_ENDPOINT ?? "127.0.0.1:50051";
// The server sends up to --max-message-mb (256 MiB); gRPC's client default would be 4 MiB.
const channelOptions = {
  "grpc.max_receive_message_length": 256 << 20,
  "grpc.max_send_message_length": 256 << 20,
};
export const lossService = new lossd.LossService(endpoint, grpc.credentials.createInsecure(), channelOptions);
export const auditService = new lossd.AuditService(endpoint, grpc.credentials.createInsecure(), channelOptions);
const raw = new grpc.Client(endpoint, grpc.credentials.createInsecure());

export function unary(service, method, request) {
  return new Promise((resolve, reject) =>
    service[method](request, { deadline: Date.now() + 120_000 }, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

export function serverStream(service, method, request) {
  return new Promise((resolve, reject) => {
    const out = [];
    const call = service[method](request, { deadline: Date.now() + 120_000 });
    call.on("data", (m) => out.push(m));
    call.on("error", reject);
    call.on("end", () => resolve(out));
  });
}

// ---------------------------------------------------------------------------------------------
// Standard services by method path, with protobufjs messages.

export function healthCheck(service = "") {
  const Req = std("grpc.health.v1.HealthCheckRequest");
  const Res = std("grpc.health.v1.HealthCheckResponse");
  return new Promise((resolve, reject) =>
    raw.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (m) => Buffer.from(Req.encode(Req.create(m)).finish()),
      (b) => Res.toObject(Res.decode(b), { enums: String }),
      { service },
      { deadline: Date.now() + 30_000 },
      (err, res) => (err ? reject(err) : resolve(res)),
    ),
  );
}

export function reflect(version, request) {
  const Req = std(`grpc.reflection.${version}.ServerReflectionRequest`);
  const Res = std(`grpc.reflection.${version}.ServerReflectionResponse`);
  return new Promise((resolve, reject) => {
    const call = raw.makeBidiStreamRequest(
      `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`,
      (m) => Buffer.from(Req.encode(Req.create(m)).finish()),
      (b) => Res.decode(b),
      { deadline: Date.now() + 30_000 },
    );
    call.on("data", (res) => {
      resolve(res);
      call.end();
    });
    call.on("error", reject);
    call.write(request);
  });
}

// The google.rpc.BadRequest an error carries, decoded from its grpc-status-details-bin trailer.
export function badRequest(error) {
  const [bin] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!bin) return null;
  const status = std("google.rpc.Status").decode(bin);
  const any = status.details.find((d) => d.type_url === "type.googleapis.com/google.rpc.BadRequest");
  return any ? std("google.rpc.BadRequest").decode(any.value) : null;
}

// ---------------------------------------------------------------------------------------------
// Tensors: raw little-endian bytes, C order, with a dtype and a shape.

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function toBfloat16(x) {
  // Round to nearest even on the upper 16 bits of the float32 pattern.
  f32[0] = x;
  const bits = u32[0];
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

function fromBfloat16(h) {
  u32[0] = h << 16;
  return f32[0];
}

function toFloat16(x) {
  // IEEE 754 binary16, round to nearest even (normals and zero: what these tests send).
  f32[0] = x;
  const bits = u32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exponent = ((bits >>> 23) & 0xff) - 127 + 15;
  const mantissa = bits & 0x7fffff;
  if ((bits & 0x7fffffff) === 0) return sign;
  if (exponent <= 0 || exponent >= 31) throw new Error(`${x} is outside float16's normal range`);
  let half = sign | (exponent << 10) | (mantissa >>> 13);
  const rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && half & 1)) half += 1;
  return half;
}

function fromFloat16(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >>> 10) & 0x1f;
  const mantissa = h & 0x3ff;
  if (exponent === 0) return sign * mantissa * 2 ** -24;
  if (exponent === 31) return mantissa ? NaN : sign * Infinity;
  return sign * (1 + mantissa / 1024) * 2 ** (exponent - 15);
}

const DTYPES = {
  float32: { wire: "DATA_TYPE_FLOAT32", size: 4 },
  float64: { wire: "DATA_TYPE_FLOAT64", size: 8 },
  float16: { wire: "DATA_TYPE_FLOAT16", size: 2 },
  bfloat16: { wire: "DATA_TYPE_BFLOAT16", size: 2 },
  int64: { wire: "DATA_TYPE_INT64", size: 8 },
};
const BY_WIRE = Object.fromEntries(Object.entries(DTYPES).map(([name, d]) => [d.wire, name]));

export function tensorBytes(dtype, values) {
  const buf = Buffer.alloc(values.length * DTYPES[dtype].size);
  values.forEach((v, i) => {
    if (dtype === "float32") buf.writeFloatLE(v, 4 * i);
    else if (dtype === "float64") buf.writeDoubleLE(v, 8 * i);
    else if (dtype === "float16") buf.writeUInt16LE(toFloat16(v), 2 * i);
    else if (dtype === "bfloat16") buf.writeUInt16LE(toBfloat16(v), 2 * i);
    else if (dtype === "int64") buf.writeBigInt64LE(BigInt(v), 8 * i);
  });
  return buf;
}

export function tensor(dtype, shape, values) {
  return { dtype: DTYPES[dtype].wire, shape: shape.map(String), data: tensorBytes(dtype, values) };
}

export function decodeTensor(t) {
  const dtype = BY_WIRE[t.dtype];
  const data = Buffer.from(t.data ?? []);
  const n = data.length / DTYPES[dtype].size;
  const values = Array.from({ length: n }, (_, i) => {
    if (dtype === "float32") return data.readFloatLE(4 * i);
    if (dtype === "float64") return data.readDoubleLE(8 * i);
    if (dtype === "float16") return fromFloat16(data.readUInt16LE(2 * i));
    if (dtype === "bfloat16") return fromBfloat16(data.readUInt16LE(2 * i));
    return Number(data.readBigInt64LE(8 * i));
  });
  return { dtype, shape: (t.shape ?? []).map(Number), values };
}

// lossd's audit digest (AuditInput.sha256), as the proto spells it.
export function tensorDigest(dtype, shape, data) {
  return createHash("sha256")
    .update(Buffer.from(`lossd-tensor-v1\0${dtype}\0${shape.join(",")}\0`, "ascii"))
    .update(data)
    .digest("hex");
}

// Values and maps.
export const tensorValue = (t) => ({ tensor_value: t });
export const str = (s) => ({ string_value: s });
export const dict = (entries) => ({
  dict_value: { entries: Object.entries(entries).map(([key, value]) => ({ key, value })) },
});
export const params = (entries) => dict(entries).dict_value;
