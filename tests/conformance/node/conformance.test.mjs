// lossd conformance, from a second language: every check here uses only proto/ and the
// documented contract. Run by tests/test_node_conformance.py against a server it starts
// (LOSSD_ENDPOINT), or by hand: `npm ci && LOSSD_ENDPOINT=127.0.0.1:50051 npm test`.
import { test } from "node:test";
import assert from "node:assert/strict";
import grpc from "@grpc/grpc-js";

import {
  FileDescriptorProto,
  auditService,
  badRequest,
  decodeTensor,
  dict,
  healthCheck,
  lossService,
  params,
  reflect,
  serverStream,
  str,
  tensor,
  tensorBytes,
  tensorDigest,
  tensorValue,
  unary,
} from "./lossd.mjs";

const close = (a, b, tol) => assert.ok(Math.abs(a - b) <= tol, `${a} vs ${b} (tolerance ${tol})`);

test("health reports SERVING for the server and its services", async () => {
  for (const service of ["", "lossd.v1.LossService", "lossd.v1.AuditService"]) {
    assert.equal((await healthCheck(service)).status, "SERVING", service);
  }
});

for (const version of ["v1", "v1alpha"]) {
  test(`reflection ${version} serves lossd/v1/lossd.proto with its comments`, async () => {
    const listed = await reflect(version, { list_services: "" });
    const names = listed.list_services_response.service.map((s) => s.name);
    for (const name of ["lossd.v1.LossService", "lossd.v1.AuditService", "grpc.health.v1.Health"]) {
      assert.ok(names.includes(name), name);
    }
    const file = await reflect(version, { file_by_filename: "lossd/v1/lossd.proto" });
    const proto = FileDescriptorProto.decode(file.file_descriptor_response.file_descriptor_proto[0]);
    assert.equal(proto.name, "lossd/v1/lossd.proto");
    assert.equal(proto.package, "lossd.v1");
    const comments = proto.sourceCodeInfo.location.map((l) => l.leadingComments ?? "").join("\n");
    assert.match(comments, /Computes losses and their gradients\./);
    assert.match(comments, /google\.rpc\.BadRequest/);
  });
}

test("ListLosses and DescribeLoss describe the registry", async () => {
  const all = await unary(lossService, "ListLosses", {});
  assert.equal(all.losses.length, 31);
  const visdet = await unary(lossService, "ListLosses", { family: "visdet" });
  assert.equal(visdet.losses.length, 12);
  const focal = (await unary(lossService, "DescribeLoss", { name: "FocalLoss" })).loss;
  assert.deepEqual(focal.families, ["visdet"]);
  const gamma = focal.params.find((p) => p.name === "gamma");
  assert.equal(gamma.type, "float");
  assert.equal(focal.inputs[0].name, "pred");
  assert.ok(focal.inputs[0].differentiable);
});

// mse on values exact in every float format: pred - target = [-0.5, 0.5, -2, 1].
const PRED = [0.5, 1.5, -1, 2];
const TARGET = [1, 1, 1, 1];
for (const dtype of ["float32", "float64", "float16", "bfloat16"]) {
  test(`Compute mse in ${dtype}: value and gradient equal the closed form`, async () => {
    const res = await unary(lossService, "Compute", {
      loss: "mse",
      args: [tensorValue(tensor(dtype, [4], PRED)), tensorValue(tensor(dtype, [4], TARGET))],
      grad_paths: ["args[0]"],
    });
    const loss = decodeTensor(res.loss.tensor_value);
    assert.equal(loss.dtype, dtype);
    assert.deepEqual(loss.shape, []);
    assert.equal(loss.values[0], 1.375); // (0.25 + 0.25 + 4 + 1) / 4
    const [grad] = res.grads;
    assert.equal(grad.path, "args[0]");
    const g = decodeTensor(grad.grad);
    assert.equal(g.dtype, dtype);
    assert.deepEqual(g.values, [-0.25, 0.25, -1, 0.5]); // 2 (pred - target) / 4
  });
}

test("a nested NetsPresso call: cross_entropy on {'pred'} and {'target'} dicts", async () => {
  const res = await unary(lossService, "Compute", {
    loss: "cross_entropy",
    args: [
      dict({ pred: tensorValue(tensor("float64", [2, 3], [0, 0, 0, 0, 0, 0])) }),
      dict({ target: tensorValue(tensor("int64", [2], [0, 2])) }),
    ],
    grad_paths: ["args[0].pred"],
  });
  close(decodeTensor(res.loss.tensor_value).values[0], Math.log(3), 1e-12);
  const g = decodeTensor(res.grads[0].grad).values;
  // (softmax - one_hot) / N with a uniform softmax of 1/3.
  const expected = [1 / 3 - 1, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3 - 1].map((v) => v / 2);
  g.forEach((v, i) => close(v, expected[i], 1e-12));
});

test("reduction='none' returns the vector-Jacobian product with grad_output", async () => {
  const res = await unary(lossService, "Compute", {
    loss: "mse",
    params: params({ reduction: str("none") }),
    args: [tensorValue(tensor("float32", [4], PRED)), tensorValue(tensor("float32", [4], TARGET))],
    grad_paths: ["args[0]", "args[1]"],
    grad_output: tensor("float32", [4], [1, 2, 3, 4]),
  });
  assert.deepEqual(decodeTensor(res.loss.tensor_value).values, [0.25, 0.25, 4, 1]);
  const byPath = Object.fromEntries(res.grads.map((g) => [g.path, decodeTensor(g.grad).values]));
  assert.deepEqual(byPath["args[0]"], [-1, 2, -12, 8]); // 2 (pred - target) * grad_output
  assert.deepEqual(byPath["args[1]"], [1, -2, 12, -8]);
});

test("ComputeChunked carries 8M-element tensors both ways", async () => {
  const n = 8 << 20;
  const pred = Buffer.alloc(4 * n);
  for (let i = 0; i < n; i++) pred.writeFloatLE((i % 4) * 0.5, 4 * i);
  const target = Buffer.alloc(4 * n); // zeros
  const empty = (shape) => ({ dtype: "DATA_TYPE_FLOAT32", shape: shape.map(String) });
  const call = lossService.ComputeChunked({ deadline: Date.now() + 300_000 });
  const messages = [];
  const done = new Promise((resolve, reject) => {
    call.on("data", (m) => messages.push(m));
    call.on("error", reject);
    call.on("end", resolve);
  });
  call.write({
    header: {
      request: {
        loss: "mse",
        args: [tensorValue(empty([n])), tensorValue(empty([n]))],
        grad_paths: ["args[0]"],
      },
      tensors: [
        { path: "args[0]", size_bytes: String(4 * n) },
        { path: "args[1]", size_bytes: String(4 * n) },
      ],
    },
  });
  const all = Buffer.concat([pred, target]);
  for (let start = 0; start < all.length; start += 1 << 20) {
    call.write({ data: all.subarray(start, start + (1 << 20)) });
  }
  call.end();
  await done;
  const [first, ...rest] = messages;
  const header = first.header;
  // (0 + 0.25 + 1 + 2.25) / 4, exact in float32.
  assert.equal(decodeTensor(header.response.loss.tensor_value).values[0], 0.875);
  assert.deepEqual(header.tensors.map((t) => t.path), ["grads[0]"]);
  assert.equal(Number(header.tensors[0].size_bytes), 4 * n);
  const grad = Buffer.concat(rest.map((m) => m.data));
  assert.equal(grad.length, 4 * n);
  for (const i of [0, 1, 2, 3, n - 1]) {
    assert.equal(grad.readFloatLE(4 * i), ((i % 4) * 0.5 * 2) / n); // 2 pred / n
  }
});

async function refusal(request) {
  try {
    await unary(lossService, "Compute", request);
  } catch (error) {
    return error;
  }
  assert.fail("the server accepted a bad request");
}

test("refusals carry their status code and a BadRequest naming the field", async () => {
  const ok = [tensorValue(tensor("float32", [2], [0, 0])), tensorValue(tensor("float32", [2], [1, 1]))];
  const cases = [
    [{ loss: "mse", params: params({ gamma: { float_value: 1 } }), args: ok }, grpc.status.INVALID_ARGUMENT, "params.gamma"],
    [
      { loss: "mse", args: [ok[0], tensorValue(tensor("float32", [3], [1, 1, 1]))] },
      grpc.status.INVALID_ARGUMENT,
      "args[1]",
    ],
    [
      { loss: "mse", args: [tensorValue({ dtype: "DATA_TYPE_FLOAT32", shape: ["2"], data: Buffer.alloc(7) }), ok[1]] },
      grpc.status.INVALID_ARGUMENT,
      "args[0].data",
    ],
    [{ loss: "no_such_loss", args: ok }, grpc.status.NOT_FOUND, "loss"],
    [
      { loss: "mse", args: [tensorValue({ dtype: "DATA_TYPE_FLOAT32", shape: Array(9).fill("1"), data: Buffer.alloc(4) }), ok[1]] },
      grpc.status.RESOURCE_EXHAUSTED,
      "args[0].shape",
    ],
  ];
  for (const [request, code, field] of cases) {
    const error = await refusal(request);
    assert.equal(error.code, code, `${field}: ${error.details}`);
    const detail = badRequest(error);
    assert.ok(detail, `${field}: a BadRequest detail`);
    assert.equal(detail.field_violations[0].field, field);
  }
  const limit = await refusal(cases[4][0]);
  assert.match(limit.details, /--max-rank/);
  // An unknown family is refused on ListLosses too, listing the families.
  await assert.rejects(unary(lossService, "ListLosses", { family: "mmdet" }), (e) => {
    assert.equal(e.code, grpc.status.INVALID_ARGUMENT);
    assert.match(e.details, /fat, netspresso, visdet/);
    return true;
  });
  // And the server goes on serving.
  assert.equal((await healthCheck("")).status, "SERVING");
});

test("an audited call round-trips through AuditService with its digests", async () => {
  const runId = `node-${process.pid}-${Date.now()}`;
  const pred = tensor("float32", [4], PRED);
  const res = await unary(lossService, "Compute", {
    loss: "mse",
    args: [tensorValue(pred), tensorValue(tensor("float32", [4], TARGET))],
    grad_paths: ["args[0]"],
    request_id: `${runId}-0`,
    audit: { run_id: runId, step: "7" }, // rank and micro_batch left unset: unknown
  });
  assert.equal(res.audited, true);
  const records = await serverStream(auditService, "GetRecords", { selector: { run_id: runId } });
  assert.equal(records.length, 1);
  const record = records[0].record;
  assert.equal(record.request_id, `${runId}-0`);
  assert.equal(record.loss, "mse");
  assert.equal(Number(record.step), 7);
  assert.equal(record.rank, undefined, "an unset rank is recorded as unknown");
  assert.equal(record.micro_batch, undefined);
  assert.equal(record.value, 1.375);
  const input = record.inputs.find((i) => i.path === "args[0]");
  assert.equal(input.sha256, tensorDigest("float32", [4], tensorBytes("float32", PRED)));
  const runs = await unary(auditService, "ListRuns", {});
  assert.ok(runs.runs.some((r) => r.run_id === runId && Number(r.records) === 1));
});
