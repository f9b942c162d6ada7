// The kernels a native replay program (cpu_replay.cpp) may call without Python: each is bound to Python and
// entered in the program's kernel table by the same def_kernel call, so the two cannot drift apart.
#pragma once
#include <torch/extension.h>
#include <ATen/core/op_registration/infer_schema.h>
#include <functional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace xllm_replay {

using Stack = std::vector<c10::IValue>;

struct Kernel {
  c10::FunctionSchema schema;  // inferred from the C++ signature, with the Python argument names
  std::function<c10::IValue(const Stack&)> call;
};

// name (as bound to Python) -> kernel, filled as the module registers its functions.
std::unordered_map<std::string, Kernel>& kernels();

template <typename R, typename... Args, size_t... I>
c10::IValue invoke(R (*fn)(Args...), const Stack& stack, std::index_sequence<I...>) {
  if constexpr (std::is_void_v<R>) {
    fn(stack[I].to<std::decay_t<Args>>()...);
    return c10::IValue();
  } else {
    return c10::IValue(fn(stack[I].to<std::decay_t<Args>>()...));
  }
}

// m.def(name, fn, args...) and fn's entry in kernels(); every argument needs its pybind11::arg name, which a
// graph may pass it by.
template <typename R, typename... Args, typename... Names>
void def_kernel(pybind11::module& m, const char* name, R (*fn)(Args...), const Names&... names) {
  static_assert(sizeof...(Names) == sizeof...(Args), "def_kernel: a pybind11::arg for every argument");
  m.def(name, fn, names...);
  const auto inferred = c10::inferFunctionSchemaFlattenedReturns<R(Args...)>();
  const std::vector<std::string> arg_names{std::string(names.name)...};
  std::vector<c10::Argument> arguments;
  for (size_t i = 0; i < arg_names.size(); ++i) arguments.emplace_back(arg_names[i], inferred.arguments()[i].type());
  c10::FunctionSchema schema(name, "", std::move(arguments), inferred.returns());
  kernels().insert_or_assign(
      name, Kernel{std::move(schema), [fn](const Stack& stack) { return invoke(fn, stack, std::index_sequence_for<Args...>{}); }});
}

}  // namespace xllm_replay
