// One transformer step of an hpedge package through ONNX Runtime's C API, compared with the
// reference output that the Python runtime saved for the same inputs.
//
//   ort_step PACKAGE STEP_DIR [ATOL]
//
// Exit codes: 0 match, 1 mismatch, 2 usage or runtime error.
//
// The C API is ONNX Runtime's ABI-stable layer (the C++ API in onnxruntime_cxx_api.h is a header-only
// wrapper around it). We ask for API version HPEDGE_ORT_API_VERSION rather than the header's
// ORT_API_VERSION so that a newer SDK header works with an older library (the function table only
// grows, so an older version's entries are a prefix of the header's struct).
#include <onnxruntime_c_api.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "step_io.hpp"

#ifndef HPEDGE_ORT_API_VERSION
#define HPEDGE_ORT_API_VERSION 16
#endif

namespace {

const OrtApi* api = nullptr;

void check(OrtStatus* status, const char* what) {
  if (status == nullptr) return;
  std::string msg = std::string(what) + ": " + api->GetErrorMessage(status);
  api->ReleaseStatus(status);
  throw std::runtime_error(msg);
}

template <typename T, void (*Release)(T*)>
struct Deleter {
  void operator()(T* p) const {
    if (p) Release(p);
  }
};
// The release functions live in the OrtApi table, so wrap them in small free functions.
void release_env(OrtEnv* p) { api->ReleaseEnv(p); }
void release_options(OrtSessionOptions* p) { api->ReleaseSessionOptions(p); }
void release_session(OrtSession* p) { api->ReleaseSession(p); }
void release_memory_info(OrtMemoryInfo* p) { api->ReleaseMemoryInfo(p); }
void release_value(OrtValue* p) { api->ReleaseValue(p); }
void release_shape(OrtTensorTypeAndShapeInfo* p) { api->ReleaseTensorTypeAndShapeInfo(p); }

using Env = std::unique_ptr<OrtEnv, Deleter<OrtEnv, release_env>>;
using Options = std::unique_ptr<OrtSessionOptions, Deleter<OrtSessionOptions, release_options>>;
using Session = std::unique_ptr<OrtSession, Deleter<OrtSession, release_session>>;
using MemoryInfo = std::unique_ptr<OrtMemoryInfo, Deleter<OrtMemoryInfo, release_memory_info>>;
using Value = std::unique_ptr<OrtValue, Deleter<OrtValue, release_value>>;
using Shape = std::unique_ptr<OrtTensorTypeAndShapeInfo, Deleter<OrtTensorTypeAndShapeInfo, release_shape>>;

int run(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACKAGE STEP_DIR [ATOL]\n", argv[0]);
    return 2;
  }
  const std::string package = argv[1];
  const double atol = argc > 3 ? std::atof(argv[3]) : 1e-4;
  api = OrtGetApiBase()->GetApi(HPEDGE_ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "this ONNX Runtime library (%s) does not offer C API version %d\n",
                 OrtGetApiBase()->GetVersionString(), HPEDGE_ORT_API_VERSION);
    return 2;
  }
  hpedge::Step step = hpedge::read_step(argv[2]);

  OrtEnv* env_raw = nullptr;
  check(api->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "hpedge", &env_raw), "CreateEnv");
  Env env(env_raw);
  OrtSessionOptions* opt_raw = nullptr;
  check(api->CreateSessionOptions(&opt_raw), "CreateSessionOptions");
  Options options(opt_raw);
  check(api->SetSessionGraphOptimizationLevel(options.get(), ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
  OrtSession* session_raw = nullptr;
  const std::string model = package + "/" + step.model;
  check(api->CreateSession(env.get(), model.c_str(), options.get(), &session_raw), "CreateSession");
  Session session(session_raw);

  OrtMemoryInfo* mem_raw = nullptr;
  check(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem_raw), "CreateCpuMemoryInfo");
  MemoryInfo memory(mem_raw);

  std::vector<Value> inputs;
  std::vector<const char*> input_names;
  for (auto& t : step.inputs) {
    OrtValue* v = nullptr;
    check(api->CreateTensorWithDataAsOrtValue(memory.get(), t.data.data(), t.data.size() * sizeof(float),
                                              t.shape.data(), t.shape.size(),
                                              ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &v),
          "CreateTensorWithDataAsOrtValue");
    inputs.emplace_back(v);
    input_names.push_back(t.name.c_str());
  }
  std::vector<const OrtValue*> input_ptrs;
  for (auto& v : inputs) input_ptrs.push_back(v.get());
  std::vector<const char*> output_names;
  for (auto& t : step.outputs) output_names.push_back(t.name.c_str());
  std::vector<OrtValue*> outputs(step.outputs.size(), nullptr);
  check(api->Run(session.get(), nullptr, input_names.data(), input_ptrs.data(), input_ptrs.size(),
                 output_names.data(), output_names.size(), outputs.data()),
        "Run");

  bool ok = true;
  for (size_t i = 0; i < outputs.size(); ++i) {
    Value out(outputs[i]);
    OrtTensorTypeAndShapeInfo* info_raw = nullptr;
    check(api->GetTensorTypeAndShape(out.get(), &info_raw), "GetTensorTypeAndShape");
    Shape info(info_raw);
    size_t count = 0;
    check(api->GetTensorShapeElementCount(info.get(), &count), "GetTensorShapeElementCount");
    const hpedge::Tensor& ref = step.outputs[i];
    if (count != ref.count()) {
      std::fprintf(stderr, "%s: %zu elements, the reference has %zu\n", ref.name.c_str(), count, ref.count());
      return 1;
    }
    float* data = nullptr;
    check(api->GetTensorMutableData(out.get(), reinterpret_cast<void**>(&data)), "GetTensorMutableData");
    ok = hpedge::report("C++", data, ref, atol) && ok;
  }
  std::printf("onnxruntime %s, model %s\n", OrtGetApiBase()->GetVersionString(), step.model.c_str());
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) { return hpedge::guarded_main(run, argc, argv); }
