// The bad-input table: each problem is a runtime::Error(bad_input) whose message names the file
// and the problem (the tools' and the trainer's exit codes are checked by bad_input.sh).
#include <ATen/ATen.h>
// After ATen: c10 defines a CHECK macro of its own that Catch must override.
#include <catch2/catch.hpp>

#include <fstream>
#include <functional>

#include "data_support.h"
#include "mpitrain/data/dataset.h"
#include "mpitrain/data/loader.h"
#include "mpitrain/runtime/error.h"

using namespace mpitrain;
using namespace mpitrain::testing;

namespace {

// Runs open() and checks it throws bad_input with every one of the fragments in its message.
void expect_bad(const std::function<void()>& open, const std::vector<std::string>& fragments) {
  try {
    open();
    FAIL("no error; expected one mentioning '" << fragments.front() << "'");
  } catch (const runtime::Error& e) {
    const std::string message = e.what();
    INFO("message: " << message);
    CHECK(e.code() == runtime::ExitCode::bad_input);
    for (const auto& fragment : fragments) CHECK_THAT(message, Catch::Contains(fragment));
  }
}

void open_classification(const std::string& source) { data::Dataset dataset(data::DatasetSpec::classification(source)); }

}  // namespace

TEST_CASE("bad input: missing file", "[data]") {
  expect_bad([] { open_classification(fixture("does-not-exist.h5")); }, {"does-not-exist.h5", "does not exist"});
  expect_bad([] { open_classification(fixture("nothing-*.h5")); }, {"nothing-*.h5", "no file matches"});
  const std::string dir = scratch("manifest-missing");
  if (world().is_root()) {
    data::Manifest manifest;
    manifest.files = {{"gone.h5", 10}};
    manifest.datasets = {{"inputs", "float32", {}}};
    data::write_manifest(dir + "/m.json", manifest);
  }
  world().barrier();
  expect_bad([&] { open_classification(dir + "/m.json"); }, {"gone.h5", "No such file"});
}

TEST_CASE("bad input: not an HDF5 file", "[data]") {
  expect_bad([] { open_classification(fixture("not_hdf5.h5")); }, {"not_hdf5.h5", "not an HDF5 file"});
  expect_bad([] { open_classification(fixture("tool")); }, {"tool", "is a directory"});
}

TEST_CASE("bad input: truncated file", "[data]") {
  expect_bad([] { open_classification(fixture("truncated.h5")); }, {"truncated.h5", "truncated file"});
}

TEST_CASE("bad input: missing dataset", "[data]") {
  expect_bad([] { open_classification(fixture("missing_targets.h5")); },
             {"missing_targets.h5", "no dataset 'targets'", "it has: inputs"});
  data::DatasetSpec spec = data::DatasetSpec::classification(fixture("h5py_gzip.h5"));
  spec.inputs = "images";
  expect_bad([&] { data::Dataset dataset(spec); }, {"h5py_gzip.h5", "no dataset 'images'", "it has: inputs, targets"});
}

TEST_CASE("bad input: inputs and targets first dimensions disagree", "[data]") {
  expect_bad([] { open_classification(fixture("rows_disagree.h5")); },
             {"rows_disagree.h5", "'inputs' has 10 rows but 'targets' has 9"});
}

TEST_CASE("bad input: unsupported dtype", "[data]") {
  expect_bad([] { open_classification(fixture("string_dtype.h5")); },
             {"string_dtype.h5", "dataset 'inputs'", "unsupported dtype string"});
  data::DatasetSpec floats = data::DatasetSpec::token_stream(fixture("h5py_gzip.h5"), 4);
  floats.tokens = "targets";
  CHECK_NOTHROW(data::Dataset(floats));  // int16 tokens are fine
  floats.tokens = "inputs";
  expect_bad([&] { data::Dataset dataset(floats); }, {"h5py_gzip.h5", "must be 1-D"});
}

TEST_CASE("bad input: zero samples", "[data]") {
  expect_bad([] { open_classification(fixture("zero.h5")); }, {"zero.h5", "no samples"});
}

TEST_CASE("bad input: fewer samples than one global batch", "[data]") {
  const int n = communicator().size();
  data::LoaderOptions options;
  options.batch_size = 104 / n + 1;  // the file has 103 samples
  expect_bad(
      [&] {
        data::Loader loader(data::DatasetSpec::classification(fixture("h5py_gzip.h5")), options, communicator().rank(), n,
                            communicator());
      },
      {"h5py_gzip.h5", "103 samples, fewer than one global batch of " + std::to_string(options.batch_size * n)});
}

TEST_CASE("bad input: sequence length longer than the token stream", "[data]") {
  expect_bad([] { data::Dataset dataset(data::DatasetSpec::token_stream(fixture("short_tokens.h5"), 8)); },
             {"short_tokens.h5", "at least 9 tokens", "has 5"});
  expect_bad([] { data::Dataset dataset(data::DatasetSpec::token_stream(fixture("short_tokens.h5"), 0)); },
             {"seq_len is 0"});
}

TEST_CASE("bad input: a filter this HDF5 build lacks is named", "[data]") {
  expect_bad([] { open_classification(fixture("lzf.h5")); }, {"lzf.h5", "dataset 'inputs'", "filter 'lzf'", "cannot decode"});
}

TEST_CASE("bad input: a manifest that does not match its files, or is not JSON", "[data]") {
  const std::string dir = scratch("manifest-bad");
  if (world().is_root()) {
    data::Manifest manifest = data::read_manifest(fixture("tool/idx/train.json"));
    for (auto& file : manifest.files) file.path = std::string(MPITRAIN_DATA_FIXTURES) + "/tool/idx/" + file.path;
    manifest.files[1].rows += 1;
    data::write_manifest(dir + "/rows.json", manifest);
    std::ofstream(dir + "/broken.json") << "{\"format\": \"mpitrain-shards\", ";
  }
  world().barrier();
  expect_bad([&] { open_classification(dir + "/rows.json"); }, {"rows.json", "does not match", "train-00001-of-00003.h5"});
  expect_bad([&] { open_classification(dir + "/broken.json"); }, {"broken.json", "not valid JSON"});
}

TEST_CASE("bad input: ids outside the model's range name the file and the sample", "[data]") {
  const std::string dir = scratch("id-range");
  if (world().is_root()) {
    data::ShardOptions options;
    options.shards = 2;  // 20 rows each
    const at::Tensor ids = at::arange(40, at::kLong);
    const at::Tensor inputs = ids.to(at::kFloat).unsqueeze(1);
    data::write_shards(dir, "long", {{"inputs", inputs}, {"targets", ids}}, options);
    data::write_shards(dir, "float", {{"inputs", inputs}, {"targets", ids.to(at::kFloat)}}, options);
    at::Tensor tokens = ids.remainder(10);
    tokens[25] = 99;  // in the second shard's window 1 (tokens 4-8 of it, at seq_len 4)
    data::write_shards(dir, "tokens", {{"tokens", tokens}}, options);
  }
  world().barrier();
  // Integer targets (widened to int64) and float ones: the first id >= 30 in the batch is sample
  // 35, the second shard's sample 15.
  for (const std::string name : {"long", "float"}) {
    data::DatasetSpec spec = data::DatasetSpec::classification(dir + "/" + name + ".json");
    spec.id_limit = 30;
    data::Dataset dataset(spec);
    CHECK_NOTHROW(dataset.read({0, 29, 17}));
    expect_bad([&] { dataset.read({3, 35, 36}); },
               {name + "-00001-of-00002.h5", "sample 15 holds target id 35, outside [0, 30) of the model",
                "h5shard verify"});
  }
  data::DatasetSpec spec = data::DatasetSpec::token_stream(dir + "/tokens.json", 4);
  spec.id_limit = 10;
  data::Dataset dataset(spec);
  CHECK_NOTHROW(dataset.read({0, 4, 6}));
  expect_bad([&] { dataset.read({0, 5}); },
             {"tokens-00001-of-00002.h5", "sample 1 holds token id 99, outside [0, 10) of the model"});
}
