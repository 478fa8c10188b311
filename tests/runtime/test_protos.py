"""The committed generated gRPC code is what the .proto sources generate, and speaks the spec."""

from edgesplit.protos import generate, inference_pb2


def test_generated_code_is_current():
    assert generate.is_current(), "run 'python -m edgesplit.protos.generate' and commit the result"


def test_open_inference_protocol_field_numbers():
    req = inference_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in req.items()} == {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    }
    resp = inference_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert resp["outputs"].number == 5 and resp["raw_output_contents"].number == 6
    tensor = inference_pb2.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name
    assert [tensor[n].number for n in ("name", "datatype", "shape", "parameters", "contents")] == [1, 2, 3, 4, 5]
    service = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ModelMetadata",
        "ModelInfer",
    }
