#pragma once
// The data layer's only contact with the HDF5 C API (private: public headers never include
// hdf5.h). Small RAII owners for hid_t, checked calls that turn HDF5's error stack into a
// runtime::Error naming the file and dataset, and the element-type table shared by the loader,
// the shard writer and the shard tools.
//
// HDF5 here is the 1.10 serial, thread-safe build: calls are serialised by the library's own
// lock, and its error stack and automatic error printing are per thread. Every entry point of
// the data layer therefore calls quiet() on the thread it runs on before its first HDF5 call.

#include <hdf5.h>

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mpitrain::data::h5 {

/// Owns one identifier and closes it with the function that matches its kind.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  ~Handle() { reset(); }
  Handle(Handle&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = other.id_;
      close_ = other.close_;
      other.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  /// Gives up ownership (to close it with a checked call).
  hid_t release() {
    const hid_t id = id_;
    id_ = H5I_INVALID_HID;
    return id;
  }
  explicit operator bool() const { return id_ >= 0; }

 private:
  void reset() {
    if (id_ >= 0 && close_ != nullptr) close_(id_);
    id_ = H5I_INVALID_HID;
  }
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

/// Turns off HDF5's automatic error printing on the calling thread (errors become exceptions).
void quiet();

/// The calling thread's HDF5 error stack as one line ("unable to open file: truncated file:
/// eof = 100, ..."), outermost description first and the root cause last; the stack is cleared.
std::string error_stack();

/// Throws runtime::Error(bad_input): "<where>: <what>: <HDF5's error stack>".
[[noreturn]] void fail(const std::string& where, const std::string& what);

/// "file 'a.h5'" or "file 'a.h5', dataset 'inputs'": how every message names its place.
std::string place(const std::string& file, const std::string& dataset = {});

/// Opens an existing file read-only. Missing file, not HDF5, truncated: clear errors.
/// file_locking=false turns HDF5's file locking off for this file (shared file systems);
/// HDF5_USE_FILE_LOCKING in the environment, when set, takes precedence (HDF5's own rule).
Handle open_file(const std::string& path, bool file_locking);
Handle open_dataset(const Handle& file, const std::string& file_name, const std::string& name);

Handle file_space(const Handle& dataset, const std::string& where);
Handle file_type(const Handle& dataset, const std::string& where);
Handle create_plist(const Handle& dataset, const std::string& where);

/// Dimensions of a dataset's dataspace (rank 0 for a scalar).
std::vector<std::int64_t> dims(const Handle& dataset, const std::string& where);
/// Chunk dimensions, empty for a contiguous or compact dataset.
std::vector<std::int64_t> chunk_dims(const Handle& dataset, const std::string& where);

struct Filter {
  int id;
  std::string name;       // as recorded in the file ("deflate", "shuffle", "lzf", ...)
  std::vector<unsigned> params;
  bool available;         // this HDF5 build can decode it
};
std::vector<Filter> filters(const Handle& dataset, const std::string& where);
/// Throws runtime::Error(bad_input) naming the first filter this build cannot decode.
void require_filters(const Handle& dataset, const std::string& where);

/// An element type mpitrain reads, and how HDF5 and LibTorch spell it.
enum class Element { i8, u8, i16, u16, i32, u32, i64, f16, f32, f64 };

const char* element_name(Element e);      // "uint8", "float16", ...
std::size_t element_bytes(Element e);
bool is_integer(Element e);
/// The element a stored one is delivered as: unsigned 16/32-bit widen to int32/int64 (LibTorch
/// has no arithmetic on them; HDF5 converts while reading); the others stay as they are.
Element widened(Element e);
/// The torch dtype of an element that has one (every element but u16 and u32).
c10::ScalarType torch_type(Element e);
/// Element of a torch dtype, for writing; unsupported dtypes throw.
Element from_torch(c10::ScalarType type);

/// Classifies a dataset's stored type; an unsupported one (string, compound, enum, uint64,
/// big floats, ...) throws naming the place and the type.
Element classify(hid_t type, const std::string& where);
/// "uint8", "float32", or a description of an unsupported type ("string", "compound", ...).
std::string describe_type(hid_t type);

/// Native in-memory type for reading an element (owned: the float16 type is built here).
Handle memory_type(Element e);
/// Little-endian standard type for writing an element.
Handle file_type_for(Element e);

/// Where rows [first, first + count) lie in the file, when they are stored there exactly as
/// they would be read into memory as element e (no filter, no type conversion, one run of
/// bytes: a contiguous dataset, or whole chunks that follow each other in the file); -1 when not.
std::int64_t stored_address(const Handle& dataset, Element e, std::int64_t first, std::int64_t count,
                            const std::string& where);
/// Reads rows [first, first + count) of every trailing dimension into `out` (memory type of e).
void read_rows(const Handle& dataset, Element e, std::int64_t first, std::int64_t count,
               void* out, const std::string& where);

}  // namespace mpitrain::data::h5
