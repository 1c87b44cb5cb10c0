// The Python module of the extension. The op schemas of the fastguide namespace are defined in one place,
// fastguide/ops.py SCHEMAS (torch.library, with the fakes, the Triton kernels and the autograd formulas);
// this library only registers CPU implementations, each family in its own file (TORCH_LIBRARY_IMPL). The
// dispatcher accepts an implementation before its schema: importing fastguide._C first is fine, and when
// ops.py defines a schema it checks it against the one inferred from the C++ signature.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

namespace {

// c10::ValueError (isa.cpp's TORCH_CHECK_VALUE) as a Python ValueError, without the C++ backtrace.
template <typename F>
auto value_errors(F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
}

}  // namespace

// A Python module so `import fastguide._C` loads the library (and registers the ops), plus the CPU
// ISA dispatch (csrc/isa.cpp): FASTGUIDE_CPU_ISA is read here, at import.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  fastguide::isa::init();
  m.def("supported_cpu_isas", &fastguide::isa::supported,
        "The kernel copies this CPU can run, narrowest first: a subset of ['baseline', 'avx2', 'avx512'].");
  m.def(
      "get_cpu_isa", [] { return value_errors([] { return fastguide::isa::current(); }); },
      "The kernel copy the CPU ops use now (default: the widest supported; FASTGUIDE_CPU_ISA at import). "
      "ValueError if FASTGUIDE_CPU_ISA is invalid and set_cpu_isa() has not replaced it.");
  m.def(
      "set_cpu_isa", [](const std::string& name) { value_errors([&] { fastguide::isa::select(name); }); },
      pybind11::arg("name"),
      "Use the kernel copy `name` ('baseline', 'avx2' or 'avx512') for the following CPU op calls, in "
      "every thread. ValueError if it is unknown or this CPU does not support it.");
}
