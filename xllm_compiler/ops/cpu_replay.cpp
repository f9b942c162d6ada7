// A replay program: a bucket graph's recorded calls (runtime/cpu_replay.py) run as one C++ loop.
//
// Replayed from Python, each of a decode step's hundred-odd calls costs about 1.5 us before its kernel
// starts: the loop's iteration, then pybind11 converting each tensor argument back to C++. Here the
// arguments are converted once, when the program is built, and a step is one call from Python: our own
// kernels are called directly (kernels(), filled by def_kernel), ATen ops through the dispatcher, and
// what is neither (a Python function) through Python, with the GIL taken back only for it.
//
// Values recomputed at every step (a call's result that later calls read: the LM head's logits) live in
// registers; an entry lists which of its arguments are registers, and they are written into its stack
// before the call. Everything else in a stack is the same tensor at every step (runtime/replay.py).
#include "cpu_replay.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <chrono>
#include <optional>
#include <stdexcept>

namespace xllm_replay {

std::unordered_map<std::string, Kernel>& kernels() {
  static std::unordered_map<std::string, Kernel> table;
  return table;
}

namespace {

namespace py = pybind11;

// A call's result as an IValue: a tensor, None, or a tuple of them (route_topk's pair).
c10::IValue to_ivalue(py::handle value) {
  if (THPVariable_Check(value.ptr())) return THPVariable_Unpack(value.ptr());
  if (value.is_none()) return c10::IValue();
  if (py::isinstance<py::tuple>(value) || py::isinstance<py::list>(value)) {
    std::vector<c10::IValue> items;
    for (const auto item : value) items.push_back(to_ivalue(item));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  throw std::invalid_argument("ReplayProgram: a register holds a " + std::string(py::str(value.get_type())));
}

enum class Kind { kKernel, kOp, kPython, kGetItem };

// An argument that is a register, by position (or by keyword, for a Python call); ``item`` >= 0: the item of
// a list argument (aten.cat's tensors).
struct Read {
  size_t position = 0;
  std::string keyword;
  int64_t item = -1;
  int64_t register_index = 0;
};

struct Entry {
  Kind kind;
  const Kernel* kernel = nullptr;            // kKernel
  std::optional<c10::OperatorHandle> op;     // kOp
  Stack stack;                               // kKernel, kOp: the arguments, registers written in before a call
  py::object function, args, kwargs;         // kPython; kKernel: the Python fallback, called when it declines
  std::vector<Read> reads;                   // the arguments (or list items) that are registers
  int64_t source = -1, index = 0;            // kGetItem: registers[source][index]
  int64_t result = -1;                       // the register the result goes to, or -1
};

class ReplayProgram {
 public:
  // A call of one of this module's kernels, ``args``/``kwargs`` as the graph gives them. A kernel that returns
  // false has declined the call (paged_decode_out on a step that is not all decode): ``fallback``, when given,
  // is then called with the same arguments.
  void add_kernel(const std::string& name, const py::tuple& args, const py::dict& kwargs, const py::list& reads,
                  int64_t result, const py::object& fallback) {
    const auto found = kernels().find(name);
    if (found == kernels().end()) throw std::invalid_argument("ReplayProgram: no native kernel named " + name);
    Entry entry{Kind::kKernel};
    entry.kernel = &found->second;
    entry.stack = torch::jit::createStackForSchema(entry.kernel->schema, args, as_kwargs(kwargs), std::nullopt);
    entry.function = fallback;
    entry.args = args;
    entry.kwargs = kwargs;
    entry.reads = to_reads(reads, &entry.kernel->schema);
    entry.result = result;
    entries_.push_back(std::move(entry));
  }

  // A call of an ATen (or any registered) operator overload, e.g. ("aten::index_select", "out").
  void add_op(const std::string& name, const std::string& overload, const py::tuple& args, const py::dict& kwargs,
              const py::list& reads, int64_t result) {
    Entry entry{Kind::kOp};
    entry.op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    // A number where the schema has a Tensor (aten.add.Tensor(x, 1e-20)) becomes a wrapped-number tensor, as
    // the operator's Python call makes it.
    torch::jit::ToIValueAllowNumbersAsTensors numbers_as_tensors(true);
    entry.stack = torch::jit::createStackForSchema(entry.op->schema(), args, as_kwargs(kwargs), std::nullopt);
    entry.reads = to_reads(reads, &entry.op->schema());
    entry.result = result;
    entries_.push_back(std::move(entry));
  }

  // A call of a Python function; ``reads`` name whole arguments, by position or keyword.
  void add_python(const py::object& function, const py::tuple& args, const py::dict& kwargs, const py::list& reads,
                  int64_t result) {
    Entry entry{Kind::kPython};
    entry.function = function;
    entry.args = args;
    entry.kwargs = kwargs;
    entry.reads = to_reads(reads, nullptr);
    entry.result = result;
    entries_.push_back(std::move(entry));
  }

  // registers[result] = registers[source][index], ``source`` holding a tuple (route_topk's pair) or a list.
  void add_getitem(int64_t source, int64_t index, int64_t result) {
    Entry entry{Kind::kGetItem};
    entry.source = source;
    entry.index = index;
    entry.result = result;
    entries_.push_back(std::move(entry));
  }

  // registers[i] holds ``value`` until a replay recomputes it (the values the capture step made).
  void set_register(int64_t i, const py::object& value) {
    if (i >= static_cast<int64_t>(registers_.size())) registers_.resize(i + 1);
    registers_[i] = to_ivalue(value);
  }

  void set_outputs(std::vector<int64_t> outputs) { outputs_ = std::move(outputs); }

  // One step: every entry in order; the registers set_outputs named, as Python objects.
  py::list run() {
    {
      py::gil_scoped_release released;
      if (entry_ns_.empty()) {
        for (auto& entry : entries_) execute(entry);
      } else {
        for (size_t i = 0; i < entries_.size(); ++i) {
          const auto start = std::chrono::steady_clock::now();
          execute(entries_[i]);
          entry_ns_[i] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
        }
      }
    }
    py::list values;
    for (const int64_t i : outputs_) values.append(torch::jit::toPyObject(registers_.at(i)));
    return values;
  }

  size_t size() const { return entries_.size(); }

  // Timing each entry of every later run (tools/profile_step.py: where a step's time goes inside the
  // program, the caches as a real step leaves them); off again with false. Off, a run reads no clock.
  void set_timing(bool on) { entry_ns_.assign(on ? entries_.size() : 0, 0); }

  // Nanoseconds each entry has taken over the runs since set_timing(true), in program order.
  const std::vector<int64_t>& entry_times() const { return entry_ns_; }

 private:
  static py::kwargs as_kwargs(const py::dict& kwargs) { return py::reinterpret_borrow<py::kwargs>(kwargs); }

  // (position or keyword, item, register) triples; a keyword becomes its position where the call has a schema.
  static std::vector<Read> to_reads(const py::list& reads, const c10::FunctionSchema* schema) {
    std::vector<Read> out;
    for (const auto& given : reads) {
      const auto triple = given.cast<py::tuple>();
      Read read;
      if (py::isinstance<py::str>(triple[0])) {
        read.keyword = triple[0].cast<std::string>();
        if (schema != nullptr) {
          const auto index = schema->argumentIndexWithName(read.keyword);
          if (!index) throw std::invalid_argument("ReplayProgram: " + schema->name() + " has no argument " + read.keyword);
          read.position = *index;
          read.keyword.clear();
        }
      } else {
        read.position = triple[0].cast<size_t>();
      }
      read.item = triple[1].cast<int64_t>();
      read.register_index = triple[2].cast<int64_t>();
      if (schema == nullptr && read.item >= 0) throw std::invalid_argument("ReplayProgram: a list item of a Python call");
      out.push_back(std::move(read));
    }
    return out;
  }

  // A Python entry's call with its registers' current values in place of theirs (the GIL held).
  py::object call_with_registers(const Entry& entry) const {
    const auto given = py::reinterpret_borrow<py::tuple>(entry.args);
    py::tuple args(given.size());
    for (size_t i = 0; i < given.size(); ++i) args[i] = given[i];
    py::dict kwargs = py::reinterpret_borrow<py::dict>(entry.kwargs).attr("copy")();
    for (const Read& read : entry.reads) {
      py::object value = torch::jit::toPyObject(registers_[read.register_index]);
      if (read.keyword.empty()) args[read.position] = value;
      else kwargs[py::str(read.keyword)] = value;
    }
    return entry.function(*args, **kwargs);
  }

  void execute(Entry& entry) {
    if (entry.kind != Kind::kPython) {
      for (const Read& read : entry.reads) {
        if (read.item < 0) entry.stack[read.position] = registers_[read.register_index];
        else entry.stack[read.position].toList().set(read.item, registers_[read.register_index]);
      }
    }
    c10::IValue result;
    switch (entry.kind) {
      case Kind::kKernel:
        result = entry.kernel->call(entry.stack);
        if (!entry.function.is_none() && result.isBool() && !result.toBool()) {
          py::gil_scoped_acquire held;
          entry.function(*entry.args, **entry.kwargs);
        }
        break;
      case Kind::kOp: {
        Stack stack = entry.stack;
        entry.op->callBoxed(&stack);
        if (stack.size() == 1) result = std::move(stack[0]);
        else if (!stack.empty()) result = c10::ivalue::Tuple::create(std::move(stack));
        break;
      }
      case Kind::kPython: {
        py::gil_scoped_acquire held;
        py::object value = entry.reads.empty() ? entry.function(*entry.args, **entry.kwargs) : call_with_registers(entry);
        if (entry.result >= 0) result = to_ivalue(value);
        break;
      }
      case Kind::kGetItem: {
        const c10::IValue& source = registers_[entry.source];
        result = source.isTuple() ? source.toTupleRef().elements().at(entry.index) : source.toListRef().at(entry.index);
        break;
      }
    }
    if (entry.result >= 0) registers_[entry.result] = std::move(result);
  }

  std::vector<Entry> entries_;
  std::vector<c10::IValue> registers_;
  std::vector<int64_t> outputs_;
  std::vector<int64_t> entry_ns_;  // per entry, while timing is on; empty when it is off
};

}  // namespace

}  // namespace xllm_replay

void register_replay(pybind11::module& m) {
  namespace py = pybind11;
  using xllm_replay::ReplayProgram;
  m.def("replay_kernels", [] {
    std::vector<std::string> names;
    for (const auto& [name, kernel] : xllm_replay::kernels()) names.push_back(name);
    return names;
  });
  py::class_<ReplayProgram>(m, "ReplayProgram")
      .def(py::init<>())
      .def("add_kernel", &ReplayProgram::add_kernel, py::arg("name"), py::arg("args"), py::arg("kwargs"),
           py::arg("reads"), py::arg("result"), py::arg("fallback"))
      .def("add_op", &ReplayProgram::add_op, py::arg("name"), py::arg("overload"), py::arg("args"), py::arg("kwargs"),
           py::arg("reads"), py::arg("result"))
      .def("add_python", &ReplayProgram::add_python, py::arg("function"), py::arg("args"), py::arg("kwargs"),
           py::arg("reads"), py::arg("result"))
      .def("add_getitem", &ReplayProgram::add_getitem, py::arg("source"), py::arg("index"), py::arg("result"))
      .def("set_register", &ReplayProgram::set_register, py::arg("index"), py::arg("value"))
      .def("set_outputs", &ReplayProgram::set_outputs, py::arg("outputs"))
      .def("run", &ReplayProgram::run)
      .def("set_timing", &ReplayProgram::set_timing, py::arg("on"))
      .def("entry_times", &ReplayProgram::entry_times)
      .def("__len__", &ReplayProgram::size);
}
