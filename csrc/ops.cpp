// Op schemas of the fastguide namespace (listed in common.h). The CPU kernels register in their
// own files (TORCH_LIBRARY_IMPL); the CUDA kernels (Triton) and fake implementations in
// fastguide/ops.py, which impl_abstract_pystub points the dispatcher to.
#include <torch/extension.h>
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(fastguide, m) {
  m.impl_abstract_pystub("fastguide.ops");
  for (const char* schema : fastguide::kSchemas) m.def(schema);
}

// A Python module so `import fastguide._C` loads the library (and registers the ops).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("schemas") = pybind11::cast(std::vector<std::string>(std::begin(fastguide::kSchemas),
                                                              std::end(fastguide::kSchemas)));
}
