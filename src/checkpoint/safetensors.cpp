#include "mpitrain/checkpoint/safetensors.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <fstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "mpitrain/checkpoint/checkpoint.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::checkpoint {
namespace {

const std::map<c10::ScalarType, std::string>& dtype_names() {
  static const std::map<c10::ScalarType, std::string> names = {
      {at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kHalf, "F16"}, {at::kBFloat16, "BF16"},
      {at::kLong, "I64"},  {at::kInt, "I32"},    {at::kShort, "I16"}, {at::kChar, "I8"},
      {at::kByte, "U8"},   {at::kBool, "BOOL"}};
  return names;
}

runtime::Error bad(const std::string& path, const std::string& problem) {
  return runtime::Error("safetensors file '" + path + "': " + problem, runtime::ExitCode::bad_input);
}

}  // namespace

void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<at::Tensor> payload;
  std::int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const auto dtype = dtype_names().find(tensor.scalar_type());
    if (dtype == dtype_names().end())
      throw runtime::Error("cannot write tensor '" + name + "' of dtype " + c10::toString(tensor.scalar_type()) +
                           " to safetensors");
    at::Tensor cpu = tensor.detach().to(at::kCPU).contiguous();
    const std::int64_t bytes = static_cast<std::int64_t>(cpu.nbytes());
    header[name] = {{"dtype", dtype->second}, {"shape", cpu.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    payload.push_back(std::move(cpu));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the format pads the header to 8 bytes
  const std::uint64_t length = text.size();
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>(length >> (8 * i));
  // Straight from the tensors' memory, through the checkpoint layer's counted writes.
  std::vector<Part> parts = {{prefix, 8}, {text.data(), text.size()}};
  for (const at::Tensor& t : payload) parts.push_back({t.data_ptr(), t.nbytes()});
  write_parts(path, parts);
}

std::map<std::string, at::Tensor> read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw bad(path, "cannot open it");
  in.seekg(0, std::ios::end);
  const std::int64_t size = in.tellg();
  in.seekg(0);
  unsigned char prefix[8] = {};
  if (size < 8 || !in.read(reinterpret_cast<char*>(prefix), 8)) throw bad(path, "shorter than its 8-byte header length");
  std::uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<std::uint64_t>(prefix[i]) << (8 * i);
  if (length > static_cast<std::uint64_t>(size - 8)) throw bad(path, "truncated (header longer than the file)");
  std::string text(length, '\0');
  in.read(text.data(), static_cast<std::streamsize>(length));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception&) {
    throw bad(path, "its header is not JSON: not a safetensors file");
  }
  const std::int64_t data_start = 8 + static_cast<std::int64_t>(length);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    c10::ScalarType dtype = at::kFloat;
    bool known = false;
    for (const auto& [type, type_name] : dtype_names())
      if (type_name == entry.value("dtype", "")) dtype = type, known = true;
    if (!known) throw bad(path, "tensor '" + name + "' has unsupported dtype " + entry.value("dtype", "?"));
    const auto shape = entry.at("shape").get<std::vector<std::int64_t>>();
    const auto offsets = entry.at("data_offsets").get<std::vector<std::int64_t>>();
    at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(dtype));
    if (offsets.size() != 2 || offsets[1] - offsets[0] != static_cast<std::int64_t>(tensor.nbytes()) ||
        data_start + offsets[1] > size)
      throw bad(path, "tensor '" + name + "' is truncated or its offsets do not match its shape");
    in.seekg(data_start + offsets[0]);
    in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
    tensors.emplace(name, tensor);
  }
  return tensors;
}

}  // namespace mpitrain::checkpoint
