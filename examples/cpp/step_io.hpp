// Reading the transformer-step files written by `python examples/cpp/save_step.py` (hpedge.runtime.Package.save_step).
//
// step.txt, one record per line (the format is hpedge's own, plain text so C++ needs no JSON parser):
//   model <path relative to the package>
//   input  <name> float32 <ndim> <d0> ... <dn-1> <file.bin>
//   output <name> float32 <ndim> <d0> ... <dn-1> <file.bin>
// Every .bin file is raw little-endian float32 in C order.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace hpedge {

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;

  size_t count() const {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  }
};

struct Step {
  std::string model;  // relative to the package root
  std::vector<Tensor> inputs;
  std::vector<Tensor> outputs;  // the Python side's reference outputs
};

inline std::vector<float> read_floats(const std::string& path, size_t count) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<float> v(count);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (static_cast<size_t>(f.gcount()) != count * sizeof(float))
    throw std::runtime_error(path + " is shorter than its shape says");
  return v;
}

inline Step read_step(const std::string& dir) {
  std::ifstream f(dir + "/step.txt");
  if (!f) throw std::runtime_error("cannot open " + dir + "/step.txt (write it with examples/cpp/save_step.py)");
  Step step;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream in(line);
    std::string kind;
    in >> kind;
    if (kind == "model") {
      in >> step.model;
      continue;
    }
    if (kind != "input" && kind != "output") throw std::runtime_error("step.txt: unknown record '" + kind + "'");
    Tensor t;
    std::string dtype, file;
    size_t ndim = 0;
    in >> t.name >> dtype >> ndim;
    if (dtype != "float32") throw std::runtime_error("step.txt: only float32 tensors are supported, got " + dtype);
    t.shape.resize(ndim);
    for (auto& d : t.shape) in >> d;
    in >> file;
    if (!in) throw std::runtime_error("step.txt: malformed line: " + line);
    t.data = read_floats(dir + "/" + file, t.count());
    (kind == "input" ? step.inputs : step.outputs).push_back(std::move(t));
  }
  if (step.model.empty() || step.inputs.empty() || step.outputs.empty())
    throw std::runtime_error("step.txt: needs a model, inputs and outputs");
  return step;
}

struct Diff {
  double max_abs = 0.0;
  double max_ref = 0.0;
};

inline Diff compare(const float* got, const Tensor& ref) {
  Diff d;
  for (size_t i = 0; i < ref.data.size(); ++i) {
    d.max_abs = std::max(d.max_abs, std::fabs(static_cast<double>(got[i]) - ref.data[i]));
    d.max_ref = std::max(d.max_ref, std::fabs(static_cast<double>(ref.data[i])));
  }
  return d;
}

// Prints one output's comparison ("MATCH"/"MISMATCH") and returns whether it is within atol.
inline bool report(const char* backend, const float* got, const Tensor& ref, double atol) {
  Diff d = compare(got, ref);
  const bool match = d.max_abs <= atol;
  std::printf("%s: max |%s - Python| = %.3g (max |ref| %.3g, atol %.3g) %s\n", ref.name.c_str(), backend, d.max_abs,
              d.max_ref, atol, match ? "MATCH" : "MISMATCH");
  return match;
}

// main() of a sample: exit 2 with one line on any error.
template <typename Run>
int guarded_main(Run run, int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

}  // namespace hpedge
