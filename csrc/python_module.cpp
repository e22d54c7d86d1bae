// Lets `import spottune_ext._C` load the library, which runs the op registrations. Only the
// Python extension compiles this file; the CMake library for C++ users leaves it out.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
