#pragma once
// safetensors files: the weights format the Python ecosystem reads (safetensors.torch.load_file)
// without executing code. Layout: 8-byte little-endian header length, a JSON header mapping
// each name to {dtype, shape, data_offsets}, then the raw little-endian bytes.
//
// Contract: write_safetensors() writes the tensors (copied to CPU, contiguous) under their
// names, in name order, through checkpoint::write_parts (fsync'd, counted as a save's progress); read_safetensors() returns them on the CPU. A file that is not
// safetensors, is truncated, or holds an unsupported dtype is runtime::Error(bad_input) naming
// the file and the problem.

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace mpitrain::checkpoint {

void write_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors);
std::map<std::string, at::Tensor> read_safetensors(const std::string& path);

}  // namespace mpitrain::checkpoint
