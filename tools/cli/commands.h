// The subcommands of `moeflux`. Each add_* registers its CLI::App on `app` and returns it with
// the function main() calls if that subcommand was chosen (it returns the exit code).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace moeflux::cli {

struct Command {
  CLI::App* app;
  std::function<int()> run;
};

Command add_convert(CLI::App& app);
Command add_inspect(CLI::App& app);
Command add_eval(CLI::App& app);
Command add_run(CLI::App& app);         // cmd_run.cpp
Command add_chat(CLI::App& app);        // cmd_run.cpp
Command add_tokenize(CLI::App& app);    // cmd_run.cpp
Command add_detokenize(CLI::App& app);  // cmd_run.cpp
Command add_synth(CLI::App& app);       // cmd_synth.cpp
Command add_bench(CLI::App& app);       // cmd_bench.cpp
Command add_perplexity(CLI::App& app);  // cmd_perplexity.cpp
Command add_routing(CLI::App& app);     // cmd_routing.cpp
Command add_cache_sim(CLI::App& app);   // cmd_cache_sim.cpp
Command add_serve(CLI::App& app);       // cmd_serve.cpp

}  // namespace moeflux::cli
