#include "harness.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace mpitrain::bench {

std::vector<std::int64_t> size_sweep(std::int64_t min_bytes, std::int64_t max_bytes) {
  std::vector<std::int64_t> sizes;
  for (std::int64_t bytes = min_bytes; bytes <= max_bytes; bytes *= 4) sizes.push_back(bytes);
  return sizes;
}

int repetitions_for(std::int64_t bytes, int base_reps) {
  // Keep each size to about 1 GiB of payload, but never fewer than 5 repetitions.
  const std::int64_t budget = std::int64_t{1} << 30;
  return static_cast<int>(std::clamp<std::int64_t>(budget / std::max<std::int64_t>(bytes, 1), 5, base_reps));
}

double time_collective(MPI_Comm comm, int warmup, int reps, const std::function<void()>& run) {
  for (int i = 0; i < warmup; ++i) run();
  std::vector<double> times;
  times.reserve(static_cast<std::size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    MPI_Barrier(comm);
    const auto start = std::chrono::steady_clock::now();
    run();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, comm);
    times.push_back(seconds);
  }
  std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
  return times[static_cast<std::size_t>(reps / 2)];
}

double algbw_gbps(std::int64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

double allreduce_busbw_factor(int ranks) { return 2.0 * (ranks - 1) / ranks; }

namespace {

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

}  // namespace

nlohmann::json machine_description(int ranks, const std::string& device_name) {
  std::array<char, 256> host{};
  gethostname(host.data(), host.size() - 1);
  nlohmann::json machine = {{"host", host.data()},
                            {"cpu", cpu_model()},
                            {"cores", std::thread::hardware_concurrency()},
                            {"ranks", ranks}};
  if (!device_name.empty()) machine["device"] = device_name;
  return machine;
}

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  std::ostringstream out;
  out << std::put_time(&utc, "%Y-%m-%dT%H:%M:%SZ");
  return out.str();
}

std::string git_commit() {
  // The benchmark runs from the checkout (scripts and build/bin live there).
  FILE* pipe = popen("git rev-parse --short HEAD 2>/dev/null", "r");
  if (pipe == nullptr) return "unknown";
  std::array<char, 64> buffer{};
  std::string commit;
  while (std::fgets(buffer.data(), buffer.size(), pipe) != nullptr) commit += buffer.data();
  pclose(pipe);
  while (!commit.empty() && (commit.back() == '\n' || commit.back() == ' ')) commit.pop_back();
  return commit.empty() ? "unknown" : commit;
}

void print_table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size());
  for (std::size_t c = 0; c < header.size(); ++c) {
    width[c] = header[c].size();
    for (const auto& row : rows) width[c] = std::max(width[c], row[c].size());
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    for (std::size_t c = 0; c < row.size(); ++c) std::cout << std::setw(static_cast<int>(width[c]) + 2) << row[c];
    std::cout << '\n';
  };
  print_row(header);
  for (const auto& row : rows) print_row(row);
  std::cout.flush();
}

void write_json(const std::string& path, const nlohmann::json& json) {
  const std::filesystem::path target(path);
  if (target.has_parent_path()) std::filesystem::create_directories(target.parent_path());
  const std::filesystem::path temporary = target.string() + ".tmp";
  {
    std::ofstream out(temporary);
    out << json.dump(2) << '\n';
    if (!out) throw std::runtime_error("cannot write benchmark result " + temporary.string());
  }
  std::filesystem::rename(temporary, target);
}

std::string format_size(std::int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int unit = 0;
  while (bytes >= 1024 && bytes % 1024 == 0 && unit < 3) {
    bytes /= 1024;
    ++unit;
  }
  return std::to_string(bytes) + " " + units[unit];
}

std::string fixed(double value, int decimals) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(decimals) << value;
  return out.str();
}

}  // namespace mpitrain::bench
