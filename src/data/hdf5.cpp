#include "hdf5.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "mpitrain/runtime/error.h"

namespace mpitrain::data::h5 {
namespace {

using runtime::Error;
using runtime::ExitCode;

herr_t collect_description(unsigned, const H5E_error2_t* record, void* data) {
  auto* descriptions = static_cast<std::vector<std::string>*>(data);
  if (record->desc != nullptr && record->desc[0] != '\0') descriptions->emplace_back(record->desc);
  return 0;
}

herr_t collect_name(hid_t, const char* name, const H5L_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  return 0;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

Handle checked(hid_t id, Handle::Closer close, const std::string& where, const char* what) {
  if (id < 0) fail(where, what);
  return Handle(id, close);
}

}  // namespace

void quiet() {
  // Once per thread: the setting is the thread's own, and setting it takes HDF5's global lock,
  // which a reader thread would otherwise take for every batch.
  thread_local bool done = false;
  if (done) return;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  done = true;
}

std::string error_stack() {
  std::vector<std::string> descriptions;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_description, &descriptions);
  H5Eclear2(H5E_DEFAULT);
  if (descriptions.empty()) return "HDF5 gave no detail";
  // The API-level description says what failed, the innermost one why.
  if (descriptions.size() == 1 || descriptions.front() == descriptions.back()) return descriptions.front();
  return descriptions.front() + ": " + descriptions.back();
}

void fail(const std::string& where, const std::string& what) {
  std::string stack = error_stack();
  std::string hint;
  if (stack.find("lock the file") != std::string::npos || stack.find("file locking") != std::string::npos)
    hint = " (on a shared file system without locks, set HDF5_USE_FILE_LOCKING=FALSE or turn the "
           "loader's file locking off)";
  throw Error(where + ": " + what + ": " + stack + hint, ExitCode::bad_input);
}

std::string place(const std::string& file, const std::string& dataset) {
  return "file '" + file + "'" + (dataset.empty() ? "" : ", dataset '" + dataset + "'");
}

Handle open_file(const std::string& path, bool file_locking) {
  quiet();
  struct stat info {};
  if (stat(path.c_str(), &info) != 0)
    throw Error(place(path) + " cannot be read: " + std::strerror(errno) + ": check the path",
                ExitCode::bad_input);
  if (S_ISDIR(info.st_mode))
    throw Error(place(path) + " is a directory: name the .h5 shards (a glob or a manifest)",
                ExitCode::bad_input);
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
  if (is_hdf5 == 0)
    throw Error(place(path) + " is not an HDF5 file (no HDF5 signature in it): give .h5 shards, "
                "e.g. made by h5shard",
                ExitCode::bad_input);
  if (is_hdf5 < 0) fail(place(path), "cannot read it");
  Handle access = checked(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, place(path), "cannot create a property list");
  if (!file_locking && H5Pset_file_locking(access.get(), false, true) < 0)
    fail(place(path), "cannot turn file locking off");
  return checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, access.get()), H5Fclose, place(path),
                 "cannot open it (a truncated or damaged file, or one still being written)");
}

Handle open_dataset(const Handle& file, const std::string& file_name, const std::string& name) {
  const bool nested = name.find('/') != std::string::npos;
  if (!nested && H5Lexists(file.get(), name.c_str(), H5P_DEFAULT) <= 0) {
    H5Eclear2(H5E_DEFAULT);
    std::vector<std::string> names;
    H5Literate(file.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr, collect_name, &names);
    H5Eclear2(H5E_DEFAULT);
    throw Error(place(file_name) + " has no dataset '" + name + "' (it has: " +
                    (names.empty() ? "nothing" : join(names)) +
                    "): name the datasets in the spec, or rewrite the file",
                ExitCode::bad_input);
  }
  // Readers here always read whole chunks and keep their own cache of decompressed chunks, so
  // HDF5's chunk cache would only add a copy: turn it off (unfiltered chunks then go straight
  // into the caller's buffer).
  Handle access = checked(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose, place(file_name, name),
                          "cannot create a property list");
  if (H5Pset_chunk_cache(access.get(), H5D_CHUNK_CACHE_NSLOTS_DEFAULT, 0, H5D_CHUNK_CACHE_W0_DEFAULT) < 0)
    fail(place(file_name, name), "cannot set the chunk cache");
  return checked(H5Dopen2(file.get(), name.c_str(), access.get()), H5Dclose, place(file_name, name),
                 "cannot open the dataset");
}

Handle file_space(const Handle& dataset, const std::string& where) {
  return checked(H5Dget_space(dataset.get()), H5Sclose, where, "cannot get the dataspace");
}

Handle file_type(const Handle& dataset, const std::string& where) {
  return checked(H5Dget_type(dataset.get()), H5Tclose, where, "cannot get the datatype");
}

Handle create_plist(const Handle& dataset, const std::string& where) {
  return checked(H5Dget_create_plist(dataset.get()), H5Pclose, where, "cannot get the creation properties");
}

std::vector<std::int64_t> dims(const Handle& dataset, const std::string& where) {
  const Handle space = file_space(dataset, where);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 0) fail(where, "cannot get the rank");
  std::vector<hsize_t> extent(static_cast<std::size_t>(rank));
  if (H5Sget_simple_extent_dims(space.get(), extent.data(), nullptr) < 0) fail(where, "cannot get the shape");
  return std::vector<std::int64_t>(extent.begin(), extent.end());
}

std::vector<std::int64_t> chunk_dims(const Handle& dataset, const std::string& where) {
  const Handle plist = create_plist(dataset, where);
  if (H5Pget_layout(plist.get()) != H5D_CHUNKED) return {};
  std::vector<hsize_t> chunk(H5S_MAX_RANK);
  const int rank = H5Pget_chunk(plist.get(), H5S_MAX_RANK, chunk.data());
  if (rank < 0) fail(where, "cannot get the chunk shape");
  return std::vector<std::int64_t>(chunk.begin(), chunk.begin() + rank);
}

std::vector<Filter> filters(const Handle& dataset, const std::string& where) {
  const Handle plist = create_plist(dataset, where);
  const int count = H5Pget_nfilters(plist.get());
  if (count < 0) fail(where, "cannot list the filters");
  std::vector<Filter> out;
  for (int i = 0; i < count; ++i) {
    unsigned flags = 0, config = 0;
    std::size_t params = 8;
    std::vector<unsigned> values(params);
    char name[256] = {};
    const H5Z_filter_t id = H5Pget_filter2(plist.get(), static_cast<unsigned>(i), &flags, &params,
                                           values.data(), sizeof name, name, &config);
    if (id < 0) fail(where, "cannot read filter " + std::to_string(i));
    values.resize(std::min<std::size_t>(params, 8));
    // A filter that is not built in may be found as a plugin; a failed search is just "no".
    const bool available = H5Zfilter_avail(id) > 0;
    H5Eclear2(H5E_DEFAULT);
    out.push_back({static_cast<int>(id), name[0] != '\0' ? name : "filter " + std::to_string(id),
                   values, available});
  }
  return out;
}

void require_filters(const Handle& dataset, const std::string& where) {
  for (const auto& filter : filters(dataset, where)) {
    if (!filter.available)
      throw Error(where + ": compressed with filter '" + filter.name + "' (id " + std::to_string(filter.id) +
                      "), which this HDF5 build cannot decode: rewrite the file with gzip (h5py: "
                      "compression='gzip'), or make the filter's plugin available through HDF5_PLUGIN_PATH",
                  ExitCode::bad_input);
  }
}

const char* element_name(Element e) {
  switch (e) {
    case Element::i8: return "int8";
    case Element::u8: return "uint8";
    case Element::i16: return "int16";
    case Element::u16: return "uint16";
    case Element::i32: return "int32";
    case Element::u32: return "uint32";
    case Element::i64: return "int64";
    case Element::f16: return "float16";
    case Element::f32: return "float32";
    case Element::f64: return "float64";
  }
  return "?";
}

std::size_t element_bytes(Element e) {
  switch (e) {
    case Element::i8:
    case Element::u8: return 1;
    case Element::i16:
    case Element::u16:
    case Element::f16: return 2;
    case Element::i32:
    case Element::u32:
    case Element::f32: return 4;
    case Element::i64:
    case Element::f64: return 8;
  }
  return 0;
}

bool is_integer(Element e) { return e != Element::f16 && e != Element::f32 && e != Element::f64; }

Element widened(Element e) {
  if (e == Element::u16) return Element::i32;
  if (e == Element::u32) return Element::i64;
  return e;
}

c10::ScalarType torch_type(Element e) {
  switch (e) {
    case Element::i8: return c10::kChar;
    case Element::u8: return c10::kByte;
    case Element::i16: return c10::kShort;
    case Element::i32: return c10::kInt;
    case Element::i64: return c10::kLong;
    case Element::f16: return c10::kHalf;
    case Element::f32: return c10::kFloat;
    case Element::f64: return c10::kDouble;
    case Element::u16:
    case Element::u32: break;
  }
  throw Error(std::string("no torch dtype for ") + element_name(e) + " (widen it first)");
}

Element from_torch(c10::ScalarType type) {
  switch (type) {
    case c10::kChar: return Element::i8;
    case c10::kByte: return Element::u8;
    case c10::kShort: return Element::i16;
    case c10::kUInt16: return Element::u16;
    case c10::kInt: return Element::i32;
    case c10::kUInt32: return Element::u32;
    case c10::kLong: return Element::i64;
    case c10::kHalf: return Element::f16;
    case c10::kFloat: return Element::f32;
    case c10::kDouble: return Element::f64;
    default: break;
  }
  throw Error(std::string("dtype ") + c10::toString(type) + " cannot be stored in a shard",
              ExitCode::bad_input);
}

std::string describe_type(hid_t type) {
  const std::size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return std::string(H5Tget_sign(type) == H5T_SGN_NONE ? "uint" : "int") + std::to_string(8 * size);
    case H5T_FLOAT: return "float" + std::to_string(8 * size);
    case H5T_STRING: return "string";
    case H5T_COMPOUND: return "compound";
    case H5T_ENUM: return "enum (h5py stores bool this way)";
    case H5T_OPAQUE: return "opaque";
    case H5T_ARRAY: return "array";
    case H5T_VLEN: return "variable-length";
    case H5T_REFERENCE: return "reference";
    case H5T_BITFIELD: return "bitfield";
    case H5T_TIME: return "time";
    default: return "unknown type";
  }
}

Element classify(hid_t type, const std::string& where) {
  const std::size_t size = H5Tget_size(type);
  const H5T_class_t kind = H5Tget_class(type);
  if (kind == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(type) != H5T_SGN_NONE;
    switch (size) {
      case 1: return is_signed ? Element::i8 : Element::u8;
      case 2: return is_signed ? Element::i16 : Element::u16;
      case 4: return is_signed ? Element::i32 : Element::u32;
      case 8:
        if (is_signed) return Element::i64;
        break;
      default: break;
    }
  } else if (kind == H5T_FLOAT) {
    std::size_t sign_pos = 0, exp_pos = 0, exp_size = 0, mant_pos = 0, mant_size = 0;
    H5Tget_fields(type, &sign_pos, &exp_pos, &exp_size, &mant_pos, &mant_size);
    if (size == 2 && exp_size == 5 && mant_size == 10) return Element::f16;
    if (size == 4 && exp_size == 8 && mant_size == 23) return Element::f32;
    if (size == 8 && exp_size == 11 && mant_size == 52) return Element::f64;
  }
  throw Error(where + ": unsupported dtype " + describe_type(type) +
                  ": store int8/16/32/64, uint8/16/32 or float16/32/64",
              ExitCode::bad_input);
}

Handle memory_type(Element e) {
  hid_t base = H5I_INVALID_HID;
  switch (e) {
    case Element::i8: base = H5T_NATIVE_INT8; break;
    case Element::u8: base = H5T_NATIVE_UINT8; break;
    case Element::i16: base = H5T_NATIVE_INT16; break;
    case Element::u16: base = H5T_NATIVE_UINT16; break;
    case Element::i32: base = H5T_NATIVE_INT32; break;
    case Element::u32: base = H5T_NATIVE_UINT32; break;
    case Element::i64: base = H5T_NATIVE_INT64; break;
    case Element::f32: base = H5T_NATIVE_FLOAT; break;
    case Element::f64: base = H5T_NATIVE_DOUBLE; break;
    case Element::f16: return file_type_for(e);  // x86 and ARM are little-endian
  }
  return checked(H5Tcopy(base), H5Tclose, "HDF5", "cannot copy a native type");
}

Handle file_type_for(Element e) {
  hid_t base = H5I_INVALID_HID;
  switch (e) {
    case Element::i8: base = H5T_STD_I8LE; break;
    case Element::u8: base = H5T_STD_U8LE; break;
    case Element::i16: base = H5T_STD_I16LE; break;
    case Element::u16: base = H5T_STD_U16LE; break;
    case Element::i32: base = H5T_STD_I32LE; break;
    case Element::u32: base = H5T_STD_U32LE; break;
    case Element::i64: base = H5T_STD_I64LE; break;
    case Element::f32: base = H5T_IEEE_F32LE; break;
    case Element::f64: base = H5T_IEEE_F64LE; break;
    case Element::f16: {
      // IEEE binary16, built the way h5py builds it, so files interchange.
      Handle half = checked(H5Tcopy(H5T_IEEE_F32LE), H5Tclose, "HDF5", "cannot copy a float type");
      if (H5Tset_fields(half.get(), 15, 10, 5, 0, 10) < 0 || H5Tset_size(half.get(), 2) < 0 ||
          H5Tset_ebias(half.get(), 15) < 0)
        fail("HDF5", "cannot build the float16 type");
      return half;
    }
  }
  return checked(H5Tcopy(base), H5Tclose, "HDF5", "cannot copy a standard type");
}

void read_rows(const Handle& dataset, Element e, std::int64_t first, std::int64_t count, void* out,
               const std::string& where) {
  const Handle space = file_space(dataset, where);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  std::vector<hsize_t> extent(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.get(), extent.data(), nullptr);
  std::vector<hsize_t> start(extent.size(), 0), size = extent;
  start[0] = static_cast<hsize_t>(first);
  size[0] = static_cast<hsize_t>(count);
  if (H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, start.data(), nullptr, size.data(), nullptr) < 0)
    fail(where, "cannot select rows");
  const Handle memory = checked(H5Screate_simple(rank, size.data(), nullptr), H5Sclose, where,
                                "cannot create a memory dataspace");
  const Handle type = memory_type(e);
  if (H5Dread(dataset.get(), type.get(), memory.get(), space.get(), H5P_DEFAULT, out) < 0)
    fail(where, "cannot read rows " + std::to_string(first) + ".." + std::to_string(first + count - 1));
}

std::int64_t stored_address(const Handle& dataset, Element e, std::int64_t first, std::int64_t count,
                            const std::string& where) {
  const Handle stored = file_type(dataset, where);
  const Handle memory = memory_type(e);
  const Handle plist = create_plist(dataset, where);
  if (H5Tequal(stored.get(), memory.get()) <= 0 || H5Pget_nfilters(plist.get()) != 0) return -1;
  const std::vector<std::int64_t> extent = dims(dataset, where);
  auto row_bytes = static_cast<std::int64_t>(element_bytes(e));
  for (std::size_t i = 1; i < extent.size(); ++i) row_bytes *= extent[i];
  const H5D_layout_t layout = H5Pget_layout(plist.get());
  if (layout == H5D_CONTIGUOUS) {
    const haddr_t base = H5Dget_offset(dataset.get());
    return base == HADDR_UNDEF ? -1 : static_cast<std::int64_t>(base) + first * row_bytes;
  }
  if (layout != H5D_CHUNKED) return -1;
  const std::vector<std::int64_t> chunk = chunk_dims(dataset, where);
  for (std::size_t i = 1; i < extent.size(); ++i)
    if (chunk[i] != extent[i]) return -1;  // a row would be spread over several chunks
  const std::int64_t rows = chunk[0];
  std::int64_t start = -1, next = -1;
  for (std::int64_t k = first / rows; k <= (first + count - 1) / rows; ++k) {
    std::vector<hsize_t> offset(extent.size(), 0);
    offset[0] = static_cast<hsize_t>(k * rows);
    unsigned mask = 0;
    haddr_t address = HADDR_UNDEF;
    hsize_t size = 0;
    if (H5Dget_chunk_info_by_coord(dataset.get(), offset.data(), &mask, &address, &size) < 0) {
      error_stack();  // clears it: the rows are read the ordinary way instead
      return -1;
    }
    if (address == HADDR_UNDEF || static_cast<std::int64_t>(size) != rows * row_bytes) return -1;
    if (start < 0) start = static_cast<std::int64_t>(address);
    else if (static_cast<std::int64_t>(address) != next) return -1;
    next = static_cast<std::int64_t>(address + size);
  }
  return start + (first % rows) * row_bytes;
}

}  // namespace mpitrain::data::h5
