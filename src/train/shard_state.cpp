#include "shard_state.h"

#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <optional>

#include "mpitrain/checkpoint/safetensors.h"
#include "mpitrain/runtime/error.h"

namespace mpitrain::train {
namespace {

const char* const kAdamWFields[] = {"exp_avg", "exp_avg_sq"};

std::string piece_name(const ddp::ShardSlice& slice) {
  return slice.name + "[" + std::to_string(slice.begin) + ":" + std::to_string(slice.begin + slice.value.numel()) + "]";
}

struct Piece {
  std::string parameter, field;
  std::int64_t begin = 0, end = 0;
};

// "<parameter>[<begin>:<end>].<field>"; nothing when the name is not of that form.
std::optional<Piece> parse(const std::string& name) {
  const auto close = name.rfind("].");
  const auto open = name.rfind('[', close);
  const auto colon = name.find(':', open);
  if (close == std::string::npos || open == std::string::npos || colon == std::string::npos || colon > close)
    return std::nullopt;
  try {
    Piece piece;
    piece.parameter = name.substr(0, open);
    std::size_t used = 0;
    piece.begin = std::stoll(name.substr(open + 1, colon - open - 1), &used);
    if (used != colon - open - 1) return std::nullopt;
    piece.end = std::stoll(name.substr(colon + 1, close - colon - 1), &used);
    if (used != close - colon - 1 || piece.begin < 0 || piece.end <= piece.begin) return std::nullopt;
    piece.field = name.substr(close + 2);
    return piece;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

bool is_adamw(torch::optim::Optimizer& optimizer) {
  return dynamic_cast<torch::optim::AdamW*>(&optimizer) != nullptr;
}

// One slice's state being assembled.
struct Assembly {
  std::map<std::string, at::Tensor> fields;  // flat, like the slice
  at::Tensor covered;                        // per element: copied from a file
  std::optional<std::int64_t> step;
};

}  // namespace

std::map<std::string, at::Tensor> shard_state(torch::optim::Optimizer& optimizer,
                                              const std::vector<ddp::ShardSlice>& shard) {
  std::map<std::string, at::Tensor> tensors;
  auto& state = optimizer.state();
  for (const ddp::ShardSlice& slice : shard) {
    const auto it = state.find(slice.value.unsafeGetTensorImpl());
    if (it == state.end()) continue;
    const std::string name = piece_name(slice);
    if (const auto* adam = dynamic_cast<const torch::optim::AdamWParamState*>(it->second.get())) {
      tensors[name + ".exp_avg"] = adam->exp_avg();
      tensors[name + ".exp_avg_sq"] = adam->exp_avg_sq();
      tensors[name + ".step"] = at::full({1}, adam->step(), at::kLong);
    } else if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(it->second.get())) {
      if (sgd->momentum_buffer().defined()) tensors[name + ".momentum_buffer"] = sgd->momentum_buffer();
    }
  }
  return tensors;
}

void load_shard_state(torch::optim::Optimizer& optimizer, const std::vector<ddp::ShardSlice>& shard,
                      const std::vector<std::string>& files) {
  at::NoGradGuard no_grad;
  const bool adamw = is_adamw(optimizer);
  std::vector<std::string> fields = adamw ? std::vector<std::string>(std::begin(kAdamWFields), std::end(kAdamWFields))
                                          : std::vector<std::string>{"momentum_buffer"};
  std::map<std::string, std::vector<std::size_t>> by_parameter;
  std::vector<Assembly> assembly(shard.size());
  for (std::size_t i = 0; i < shard.size(); ++i) {
    by_parameter[shard[i].name].push_back(i);
    const at::Tensor& value = shard[i].value;
    for (const std::string& field : fields) assembly[i].fields[field] = at::zeros({value.numel()}, value.options().device(at::kCPU));
    assembly[i].covered = at::zeros({static_cast<std::int64_t>(fields.size()), value.numel()}, at::kBool);
  }
  const auto complete = [&] {
    return std::all_of(assembly.begin(), assembly.end(), [](const Assembly& a) { return a.covered.all().item<bool>(); });
  };
  std::string read;  // the files read, for messages
  bool any = false;
  for (const std::string& path : files) {
    if (complete()) break;
    read += (read.empty() ? "" : ", ") + path;
    for (const auto& [name, tensor] : checkpoint::read_safetensors(path)) {
      const std::optional<Piece> piece = parse(name);
      if (!piece)
        throw runtime::Error("optimizer shard file " + path + " holds '" + name +
                                 "', not a parameter[begin:end].field name: it was not written by this trainer",
                             runtime::ExitCode::bad_input);
      const auto field = std::find(fields.begin(), fields.end(), piece->field);
      if (piece->field != "step" && field == fields.end())
        throw runtime::Error("optimizer shard file " + path + " holds state '" + piece->field + "' of parameter '" +
                                 piece->parameter + "', which this run's optimizer (" + (adamw ? "adamw" : "sgd") +
                                 ") does not keep; resume with the optimizer.name the checkpoint was written with",
                             runtime::ExitCode::bad_input);
      const auto slices = by_parameter.find(piece->parameter);
      if (slices == by_parameter.end()) continue;  // another rank's parameter
      any = true;
      for (std::size_t i : slices->second) {
        const ddp::ShardSlice& slice = shard[i];
        const std::int64_t lo = std::max(piece->begin, slice.begin);
        const std::int64_t hi = std::min(piece->end, slice.begin + slice.value.numel());
        if (lo >= hi) continue;
        if (piece->field == "step") {
          const std::int64_t step = tensor.reshape({-1})[0].item<std::int64_t>();
          if (assembly[i].step && *assembly[i].step != step)
            throw runtime::Error("optimizer shard files " + read + " disagree on the step count of parameter '" +
                                     slice.name + "' (" + std::to_string(*assembly[i].step) + " and " +
                                     std::to_string(step) + "): the checkpoint is inconsistent; pick another one",
                                 runtime::ExitCode::bad_input);
          assembly[i].step = step;
          continue;
        }
        if (tensor.dim() != 1 || tensor.numel() != piece->end - piece->begin)
          throw runtime::Error("optimizer shard file " + path + ": '" + name + "' has " + std::to_string(tensor.numel()) +
                                   " elements for a range of " + std::to_string(piece->end - piece->begin),
                               runtime::ExitCode::bad_input);
        const auto f = static_cast<std::int64_t>(field - fields.begin());
        assembly[i].fields[piece->field].narrow(0, lo - slice.begin, hi - lo).copy_(tensor.narrow(0, lo - piece->begin, hi - lo));
        assembly[i].covered[f].narrow(0, lo - slice.begin, hi - lo).fill_(true);
      }
    }
  }
  if (!any) return;  // saved before the first step: no state anywhere
  for (std::size_t i = 0; i < shard.size(); ++i) {
    if (!assembly[i].covered.all().item<bool>() || (adamw && !assembly[i].step))
      throw runtime::Error("optimizer shard files " + read + " do not hold the whole state of parameter '" +
                               shard[i].name + "' (elements " + std::to_string(shard[i].begin) + " to " +
                               std::to_string(shard[i].begin + shard[i].value.numel()) +
                               "): the checkpoint is of another model or incomplete; pick another one",
                           runtime::ExitCode::bad_input);
  }

  auto& state = optimizer.state();
  for (std::size_t i = 0; i < shard.size(); ++i) {
    const at::Tensor& value = shard[i].value;
    auto on_device = [&](const std::string& field) { return assembly[i].fields.at(field).to(value.device()); };
    if (adamw) {
      auto entry = std::make_unique<torch::optim::AdamWParamState>();
      entry->step(*assembly[i].step);
      entry->exp_avg(on_device("exp_avg"));
      entry->exp_avg_sq(on_device("exp_avg_sq"));
      state[value.unsafeGetTensorImpl()] = std::move(entry);
    } else {
      auto entry = std::make_unique<torch::optim::SGDParamState>();
      entry->momentum_buffer(on_device("momentum_buffer"));
      state[value.unsafeGetTensorImpl()] = std::move(entry);
    }
  }
}

}  // namespace mpitrain::train
