// Op schemas of the fastguide namespace. The CPU kernels register in their own files
// (TORCH_LIBRARY_IMPL), the CUDA kernels (Triton) and fake implementations in
// fastguide/ops.py, which impl_abstract_pystub points the dispatcher to.
//
// Every scale appears twice: `Tensor? <name>_t` and `float <name>`. A tensor scale (0-d or [B],
// on the input's device) wins when given; it lets a CUDA graph or a compiled graph take a new
// value each step without a recompile or a host sync. A Python float needs no allocation.
#include <torch/extension.h>
#include <torch/library.h>

#include "guidance.h"

TORCH_LIBRARY(fastguide, m) {
  m.impl_abstract_pystub("fastguide.ops");
  for (const char* schema : fastguide::kSchemas) m.def(schema);
}

// A Python module so `import fastguide._C` loads the library (and registers the ops).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("schemas") = pybind11::cast(std::vector<std::string>(std::begin(fastguide::kSchemas),
                                                              std::end(fastguide::kSchemas)));
}
