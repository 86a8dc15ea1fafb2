// One transformer step of an hpedge package through a TensorRT engine (TensorRT 10 C++ API),
// compared with the reference output that the Python side saved for the same inputs.
//
//   trt_step ENGINE.plan STEP_DIR [ATOL]
//
// ENGINE.plan is the package's engines/transformer_int4-<key>.plan (written by `hpedge export` on a
// GPU with TensorRT, or by `hpedge build PACKAGE` on the device). The reference in STEP_DIR comes from
// the INT4 ONNX model on ONNX Runtime, so expect INT4-kernel-level differences: pass an ATOL that
// suits your model (the default 5e-2 is for the digits models).
// Exit codes: 0 match, 1 mismatch, 2 usage or runtime error.
#include <NvInfer.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "step_io.hpp"

namespace {

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
  }
};

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { cuda_check(cudaMalloc(&ptr, bytes), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    default: throw std::runtime_error("the sample handles float32 and float16 I/O tensors only");
  }
}

int run(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s ENGINE.plan STEP_DIR [ATOL]\n", argv[0]);
    return 2;
  }
  const double atol = argc > 3 ? std::atof(argv[3]) : 5e-2;
  std::ifstream f(argv[1], std::ios::binary);
  if (!f) throw std::runtime_error(std::string("cannot open engine ") + argv[1]);
  std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  hpedge::Step step = hpedge::read_step(argv[2]);

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!engine) throw std::runtime_error("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)");
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  cudaStream_t stream;
  cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");

  std::vector<std::unique_ptr<DeviceBuffer>> buffers;
  for (const auto& t : step.inputs) {
    if (engine->getTensorDataType(t.name.c_str()) != nvinfer1::DataType::kFLOAT)
      throw std::runtime_error("input " + t.name + " is not float32 in the engine");
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(t.shape.size());
    for (size_t i = 0; i < t.shape.size(); ++i) dims.d[i] = t.shape[i];
    if (!context->setInputShape(t.name.c_str(), dims))
      throw std::runtime_error("input " + t.name + ": shape outside the engine's optimization profile");
    buffers.push_back(std::make_unique<DeviceBuffer>(t.data.size() * sizeof(float)));
    cuda_check(cudaMemcpyAsync(buffers.back()->ptr, t.data.data(), t.data.size() * sizeof(float),
                               cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync H2D");
    context->setTensorAddress(t.name.c_str(), buffers.back()->ptr);
  }
  std::map<std::string, std::pair<DeviceBuffer*, size_t>> outputs;  // name -> (buffer, elements)
  for (const auto& t : step.outputs) {
    nvinfer1::Dims dims = context->getTensorShape(t.name.c_str());
    size_t n = 1;
    for (int32_t i = 0; i < dims.nbDims; ++i) n *= static_cast<size_t>(dims.d[i]);
    if (n != t.count()) throw std::runtime_error("output " + t.name + ": engine shape differs from the reference");
    buffers.push_back(std::make_unique<DeviceBuffer>(n * element_size(engine->getTensorDataType(t.name.c_str()))));
    context->setTensorAddress(t.name.c_str(), buffers.back()->ptr);
    outputs[t.name] = {buffers.back().get(), n};
  }
  if (!context->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");
  cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  bool ok = true;
  for (const auto& ref : step.outputs) {
    auto [buffer, n] = outputs[ref.name];
    std::vector<float> host(n);
    if (engine->getTensorDataType(ref.name.c_str()) == nvinfer1::DataType::kHALF) {
      std::vector<__half> half(n);
      cuda_check(cudaMemcpy(half.data(), buffer->ptr, n * 2, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
      for (size_t i = 0; i < n; ++i) host[i] = __half2float(half[i]);
    } else {
      cuda_check(cudaMemcpy(host.data(), buffer->ptr, n * 4, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    }
    ok = hpedge::report("TensorRT", host.data(), ref, atol) && ok;
  }
  cudaStreamDestroy(stream);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) { return hpedge::guarded_main(run, argc, argv); }
