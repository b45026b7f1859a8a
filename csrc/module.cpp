/*
 * dip_fast::_C: the pybind11 module and what the build knows about itself.
 *
 * No op is declared here. Each op family is one set of files with one name:
 *
 *   ops/<family>.cpp          the family's schemas (TORCH_LIBRARY_FRAGMENT) and,
 *                             where the formula is C++, its autograd kernels
 *   common/<family>*.h        per-element math shared by CPU and CUDA (DIP_HD
 *                             helpers), argument checks, launch plans
 *   cpu/<family>.cpp          CPU kernels (TORCH_LIBRARY_IMPL(dip_fast, CPU))
 *   cpu/<family>_emulated.cpp test only: the CUDA launch grid replayed on the
 *                             CPU, with its own schemas (_<op>_emulated)
 *   cuda/<family>.cu          CUDA kernels (TORCH_LIBRARY_IMPL(dip_fast, CUDA))
 *   dip_fast/ops/<family>.py  fake kernels, Python autograd formulas, wrapper
 *   tests/test_ops_<family>.py
 *
 * The families: leaky_relu, bn_act, upsample_cat, downsample. Backward ops are
 * private (leading underscore), as torchvision's are. CONTRIBUTING.md has the
 * recipe for adding one.
 */
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/alloc.h"  // the poison switch

#ifndef DIP_FAST_CUDA_ARCHS
#define DIP_FAST_CUDA_ARCHS ""
#endif

namespace {

bool cuda_compiled() {
#ifdef DIP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool openmp_compiled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Names of the ops registered in the dip_fast namespace, read back from the
// dispatcher so the list can never disagree with what was really registered.
std::vector<std::string> registered_ops() {
  std::vector<std::string> names;
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("dip_fast::", 0) == 0) {
      names.push_back(op.name.substr(10) + (op.overload_name.empty() ? "" : "." + op.overload_name));
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Whether a given op has a kernel for a dispatch key ("CPU", "CUDA").
bool has_kernel(const std::string& op, const std::string& key) {
  auto handle = c10::Dispatcher::singleton().findSchema({"dip_fast::" + op, ""});
  if (!handle) return false;
  return handle->hasKernelForDispatchKey(c10::parseDispatchKey(key));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dip_fast compiled ops (registered under torch.ops.dip_fast)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("cuda_archs", []() { return std::string(DIP_FAST_CUDA_ARCHS); },
        "The CUDA architectures the kernels were compiled for");
  m.def("openmp", &openmp_compiled, "True when the CPU kernels were compiled with OpenMP");
  m.def("parallel_info", []() { return at::get_parallel_info(); }, "ATen's threading summary");
  m.def("set_poison_outputs", &dip_fast::set_poison_outputs,
        "Fill every op output with NaN before its kernel runs (tests use this)", pybind11::arg("on"));
  m.def("poison_outputs", &dip_fast::poison_outputs_enabled, "Whether outputs are poisoned");
  m.def("registered_ops", &registered_ops, "Names of the ops in the dip_fast namespace");
  m.def("has_kernel", &has_kernel, "Whether op has a kernel for a dispatch key", pybind11::arg("op"),
        pybind11::arg("key"));
}
