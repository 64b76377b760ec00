#include "mpitrain/pipeline/schedule.h"

#include <algorithm>

namespace mpitrain::pipeline {

std::vector<Action> actions(config::PipelineSchedule schedule, int stages, int stage, int micro_batches) {
  std::vector<Action> order;
  order.reserve(static_cast<std::size_t>(2 * micro_batches));
  const int warm_up = schedule == config::PipelineSchedule::gpipe ? micro_batches
                                                                  : std::min(stages - stage - 1, micro_batches);
  int forwards = 0, backwards = 0;
  for (; forwards < warm_up; ++forwards) order.push_back({Action::forward, forwards});
  for (; forwards < micro_batches; ++forwards, ++backwards) {
    order.push_back({Action::forward, forwards});
    order.push_back({Action::backward, backwards});
  }
  for (; backwards < micro_batches; ++backwards) order.push_back({Action::backward, backwards});
  return order;
}

int max_in_flight(const std::vector<Action>& actions) {
  int now = 0, most = 0;
  for (const Action& action : actions) {
    now += action.kind == Action::forward ? 1 : -1;
    most = std::max(most, now);
  }
  return most;
}

double bubble_fraction(int stages, int micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(micro_batches + stages - 1);
}

}  // namespace mpitrain::pipeline
