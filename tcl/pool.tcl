# Worker pools that run themselves: ::socketserver::pool create ... returns an object command.
#
# The serving process is the monitor. It forks the workers (with ::socketserver::fork, so no
# Tclx is needed), or, with -exec, starts each as a program of its own (::socketserver::spawn)
# that registers at the server's -path; it replaces those that die (SIGCHLD, trapped with
# ::socketserver::trap), retires and replaces them after -maxconnections, resizes, reloads and
# stops without dropping a connection. It never serves connections itself. Both kinds take the
# same paths: only how a worker is started (Spawn) and how the monitor learns that it has
# registered (a pipe for forked workers, the dispatcher's list for exec'd ones: see Tick) differ.
#
# A worker takes one connection at a time and asks for the next when the previous channel has
# closed (::socketserver::onclose), so both synchronous and fileevent-driven handlers work without
# re-arming by hand; `::socketserver::socket park` closes the channel too, so a handler that hands
# a kept-alive connection back to the dispatcher frees its worker the same way. A worker that is told to retire (SIGTERM) finishes its current connection
# and exits; an idle one exits at once, and a connection the dispatcher had already sent it goes
# to another worker (the dispatcher reads back a connection that a worker had not taken).
#
# Behind a load balancer with an agent check (`server -agent`), stop and reload drain first: the
# agent answers `drain`, and the pool waits (up to -draintime ms) until a balancer has heard it
# and stopped sending, before it closes the port or replaces the workers (see Drain).

namespace eval ::socketserver::pool {
    variable counter 0
    variable running {}    ;# pools not yet stopped, all served by one SIGCHLD trap
    variable options {-port -workers -init -maxconnections -timeout -grace -log -signals -notifier
                      -restartdelay -maxrestartdelay
                      -draintime -exec}
    variable workeroptions {-path -maxconnections -notifier}
    namespace export create worker
    namespace ensemble create -subcommands {create worker}
}

# Usage: ::socketserver::pool create ?-option value ...? handler
#        ::socketserver::pool create -exec command ?-option value ...?
proc ::socketserver::pool::create {args} {
    variable counter
    variable options
    # Without -exec the last word is the handler; an -exec pool's workers bring their own.
    if {[llength $args] % 2 == 0 && ![Given -exec $args]} {
        return -code error -errorcode {TCL WRONGARGS} \
            "wrong # args: should be \"::socketserver::pool create ?-port port? ?-workers n? ?-init script? ?-maxconnections n? ?-timeout ms? ?-grace ms? ?-log command? ?-signals bool? ?-notifier poll|tcl? ?-restartdelay ms? ?-maxrestartdelay ms? ?-draintime ms? handler\" or \"::socketserver::pool create -exec command ?-option value ...?\""
    }
    if {[llength $args] % 2} {
        set handler [lindex $args end]
        set words [lrange $args 0 end-1]
        if {[Given -exec $words]} {
            return -code error -errorcode {SOCKETSERVER POOL CONFLICT} \
                "a handler cannot be used with \"-exec\": the program serves the connections"
        }
        # Checked here, once, rather than failing later in every worker.
        CheckPrefix handler $handler
    } else {
        set handler {}
        set words $args
    }
    set config [dict create -port {} -workers 4 -init {} -maxconnections 0 -timeout 0 \
                    -grace 5000 -log [list ::socketserver::pool::LogToStderr] -signals 0 \
                    -notifier poll -restartdelay 1000 -maxrestartdelay 60000 -draintime 3000 \
                    -exec {}]
    set config [ParseOptions $config $words]
    CheckKind [expr {$handler eq {}}] [dict keys [FullOptions $words]]
    if {[dict get $config -port] eq {}} {
        dict set config -port [dict get [::socketserver::info] port]
    } else {
        ::socketserver::info [dict get $config -port] ;# errors if the port is not served here
    }
    set port [dict get $config -port]
    if {$handler eq {} && [dict get [::socketserver::info $port] path] eq {}} {
        return -code error -errorcode {SOCKETSERVER POOL NOPATH} \
            "port $port has no registration path: an -exec pool needs a server opened with -path"
    }
    set name ::socketserver::pool::pool[incr counter]
    namespace eval $name {
        variable config
        variable handler
        # pid -> {started ms role new|old|retiring registered 0|1 max -maxconnections}
        variable workers [dict create]
        variable totals [dict create respawned 0 recycled 0 timeouts 0 reloads 0]
        variable counts [dict create accepted 0 delivered 0 parked 0 parkedtotal 0 handedback 0 \
                             closedidle 0 closedheader 0 closedpeer 0 evicted 0 draining 0]
        variable stopping 0
        variable stopped 0
        variable tick {}
        # Failed starts in a row, the timer of the delayed start they caused and its delay (ms)
        # (see FailedStart).
        variable failedstarts 0
        # Whether a worker of the pool has been seen registered since -exec last changed: the
        # program can register (see Reap).
        variable proven 0
        variable restart {}
        variable backoff 0
        # While a reload runs: {fresh pids failed 0|1 pending 0|1} (see Reload).
        variable reloading {}
        # A pipe whose write end only the monitor keeps: workers see EOF when it is gone.
        variable lifeline [chan pipe]
        # A pipe on which each worker writes its pid once it has registered with the dispatcher:
        # the monitor learns it without polling, before it reaps the worker.
        variable started [chan pipe]
    }
    chan configure [lindex [set ${name}::started] 0] -blocking 0
    chan event [lindex [set ${name}::started] 0] readable [list ::socketserver::pool::Started $name]
    set ${name}::config $config
    set ${name}::handler $handler
    proc $name {method args} [format {::socketserver::pool::Dispatch %s $method $args} [list $name]]
    variable running
    lappend running $name
    ::socketserver::trap CHLD ::socketserver::pool::ReapAll
    if {[dict get $config -signals]} {
        # One trap per signal for every pool that asked: the last pool created must not take
        # them from the others.
        foreach signal {TERM INT HUP} {
            ::socketserver::trap $signal [list ::socketserver::pool::OnSignal $signal]
        }
    }
    Refill $name
    Tick $name
    return $name
}

# Raises a clear error unless value is a valid list (a command prefix called with {*}), and a
# non-empty one for the handler and -exec.
proc ::socketserver::pool::CheckPrefix {what value} {
    if {[catch {llength $value} n options]} {
        return -code error -errorcode [dict get $options -errorcode] \
            "bad $what \"$value\": not a valid command prefix ($n)"
    }
    if {$what in {handler "-exec command"} && $n == 0} {
        return -code error -errorcode {TCL VALUE LIST} "bad $what \"\": empty command prefix"
    }
}

# A pool is forked (exec 0) or exec'd (exec 1) for good: the options of the other kind, given at
# create or configure, are refused.
proc ::socketserver::pool::CheckKind {exec given} {
    set conflicting [expr {$exec ? {-init -notifier} : {-exec}}]
    foreach option $given {
        if {$option in $conflicting} {
            return -code error -errorcode {SOCKETSERVER POOL CONFLICT} [expr {$exec
                ? "\"$option\" cannot be used with \"-exec\": the program loads its own code"
                : "\"-exec\" can only be changed in a pool created with \"-exec\""}]
        }
    }
}

# The option a word names: the option itself or a unique prefix of it, as with Tcl's own
# commands (and the same errors: bad or ambiguous option, TCL LOOKUP INDEX option).
proc ::socketserver::pool::Option {word {table options}} {
    variable $table
    return [tcl::prefix match -message option [set $table] $word]
}

# -option value ... with every option spelled out.
proc ::socketserver::pool::FullOptions {words {table options}} {
    set full {}
    foreach {option value} $words {
        lappend full [Option $option $table] $value
    }
    return $full
}

# Whether the words (-option value ...) set option; bad options are left for the parser.
proc ::socketserver::pool::Given {option words} {
    foreach {word value} $words {
        if {![catch {Option $word} full] && $full eq $option} {
            return 1
        }
    }
    return 0
}

proc ::socketserver::pool::ParseOptions {config words {table options}} {
    foreach {option value} [FullOptions $words $table] {
        switch -- $option {
            -workers - -maxconnections - -timeout - -grace - -restartdelay - -maxrestartdelay - -draintime {
                if {![string is entier -strict $value] || $value < 0} {
                    return -code error -errorcode {TCL VALUE NUMBER} \
                        "expected non-negative integer but got \"$value\""
                }
            }
            -signals {
                if {![string is boolean -strict $value]} {
                    return -code error -errorcode {TCL VALUE BOOLEAN} \
                        "expected boolean value but got \"$value\""
                }
            }
            -log {
                CheckPrefix "-log command" $value
            }
            -exec {
                CheckPrefix "-exec command" $value
            }
            -notifier {
                if {$value ni {poll tcl}} {
                    return -code error -errorcode [list TCL LOOKUP INDEX notifier $value] \
                        "bad notifier \"$value\": must be poll or tcl"
                }
            }
        }
        dict set config $option $value
    }
    return $config
}

proc ::socketserver::pool::Dispatch {name method words} {
    set method [tcl::prefix match -message method {cget configure reload resize stats stop wait} $method]
    # While a stop runs (in a nested event loop) the pool is as good as stopped; a second stop
    # returns at once.
    if {([set ${name}::stopped] || ([set ${name}::stopping] && $method ne "stop"))
            && $method ni {stats wait cget}} {
        return -code error -errorcode {SOCKETSERVER POOL STOPPED} "pool $name is stopped"
    }
    switch -- $method {
        cget {
            if {[llength $words] != 1} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name cget option\""
            }
            return [dict get [set ${name}::config] [Option [lindex $words 0]]]
        }
        configure {
            if {[llength $words] == 0} {
                return [set ${name}::config]
            }
            if {[llength $words] % 2} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name configure ?-option value ...?\""
            }
            set words [FullOptions $words]
            foreach {option value} $words {
                if {$option in {-port -signals}} {
                    return -code error -errorcode {SOCKETSERVER POOL READONLY} "option \"$option\" can only be set at create"
                }
            }
            set config [ParseOptions [set ${name}::config] $words]
            CheckKind [expr {[dict get [set ${name}::config] -exec] ne {}}] [dict keys $words]
            if {[dict get $config -exec] ne [dict get [set ${name}::config] -exec]} {
                set ${name}::proven 0
            }
            set ${name}::config $config
            if {[dict exists $words -workers]} {
                Resize $name [dict get $words -workers]
            }
            return
        }
        resize {
            if {[llength $words] != 1} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name resize count\""
            }
            set ${name}::config [ParseOptions [set ${name}::config] [list -workers [lindex $words 0]]]
            Resize $name [lindex $words 0]
            return
        }
        reload {
            if {[llength $words] != 0} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name reload\""
            }
            Reload $name 1
            return
        }
        stats {
            return [Stats $name]
        }
        stop {
            set grace [dict get [set ${name}::config] -grace]
            if {[llength $words] == 2 && [Option [lindex $words 0]] eq "-grace"} {
                set grace [dict get [ParseOptions [set ${name}::config] $words] -grace]
            } elseif {[llength $words] != 0} {
                return -code error -errorcode {TCL WRONGARGS} "wrong # args: should be \"$name stop ?-grace ms?\""
            }
            Stop $name $grace
            return
        }
        wait {
            if {![set ${name}::stopped]} {
                vwait ${name}::stopped
            }
            return
        }
    }
}

proc ::socketserver::pool::Log {name message} {
    set log [dict get [set ${name}::config] -log]
    if {$log ne {}} {
        # Only an error is one: a break, continue or return from the command is not.
        if {[catch {{*}$log $message} error options] == 1} {
            catch {{*}[interp bgerror {}] $error $options}
        }
    }
}

proc ::socketserver::pool::LogToStderr {message} {
    puts stderr "socketserver pool [pid]: $message"
}

# Workers the pool counts toward its size: not retiring, not replaced by a reload.
proc ::socketserver::pool::Active {name} {
    set active {}
    dict for {pid worker} [set ${name}::workers] {
        if {[dict get $worker role] eq "new"} {
            lappend active $pid
        }
    }
    return $active
}

# Starts workers until the pool has its size.  The refill after a worker ended (auto) waits while
# a failed start has delayed the next one; an operator's (create, resize, reload) starts at once.
proc ::socketserver::pool::Refill {name {auto 0}} {
    upvar #0 ${name}::stopping stopping ${name}::restart restart ${name}::backoff backoff
    if {$stopping || ($auto && $restart ne {})} {
        return
    }
    after cancel $restart
    set restart {}
    set backoff 0
    set want [dict get [set ${name}::config] -workers]
    for {set have [llength [Active $name]]} {$have < $want} {incr have} {
        if {[catch {Spawn $name} error]} {
            set how [expr {[dict get [set ${name}::config] -exec] eq {} ? "fork" : "start"}]
            FailedStart $name "cannot $how a worker: $error"
            return
        }
    }
}

# A worker failed to start, or could not be forked: the next start waits -restartdelay ms,
# doubled for each failed start in a row up to -maxrestartdelay, as supervisors back off
# (systemd's RestartSteps and StartLimitBurst); failures while a start is delayed are one round.
# A worker that registers with the dispatcher ends the run (see Started).
proc ::socketserver::pool::FailedStart {name why} {
    upvar #0 ${name}::restart restart ${name}::failedstarts failedstarts ${name}::backoff backoff
    if {$restart ne {}} {
        Log $name "$why: next start already delayed"
        return
    }
    incr failedstarts
    set config [set ${name}::config]
    set backoff [expr {min([dict get $config -maxrestartdelay],
                           [dict get $config -restartdelay] << min($failedstarts - 1, 32))}]
    Log $name "$why: $failedstarts failed starts in a row, next start in $backoff ms"
    set restart [after $backoff [list ::socketserver::pool::Refill $name]]
}

proc ::socketserver::pool::Spawn {name} {
    set config [set ${name}::config]
    set pid [expr {[dict get $config -exec] eq {} ? [Fork $name] : [Exec $name]}]
    dict set ${name}::workers $pid [dict create started [clock milliseconds] role new registered 0 \
                                        max [dict get $config -maxconnections]]
    if {[dict get $config -exec] ne {}} {
        Hurry $name ;# to see it register soon (see Tick)
    }
    return $pid
}

proc ::socketserver::pool::Fork {name} {
    # Output still buffered in the monitor would be written once more by the child.
    foreach chan [chan names] {
        catch {flush $chan}
    }
    set pid [::socketserver::fork]
    if {$pid == 0} {
        # The worker. It must never return into the monitor's code, whatever happens.
        catch {WorkerMain $name}
        exit 1
    }
    return $pid
}

# Starts -exec's program, which registers at the server's path itself; the environment tells it
# where and how many connections to take (see `pool worker`, examples/worker.py).
proc ::socketserver::pool::Exec {name} {
    set config [set ${name}::config]
    set port [dict get $config -port]
    set env [dict create SOCKETSERVER_PATH [dict get [::socketserver::info $port] path] \
                 SOCKETSERVER_PORT $port SOCKETSERVER_MAXCONNECTIONS [dict get $config -maxconnections]]
    # A process group of its own: Ctrl-C at the monitor's terminal is the monitor's to handle
    # (a worker of its own retires on SIGINT), as forked workers ignore it.
    return [::socketserver::spawn -env $env -newgroup 1 -- {*}[dict get $config -exec]]
}

# The started pipe is readable: workers that have registered with the dispatcher wrote their pid.
proc ::socketserver::pool::Started {name} {
    set chan [lindex [set ${name}::started] 0]
    while {[gets $chan pid] >= 0} {
        Registered $name $pid
    }
}

# Worker pid has registered with the dispatcher (the pool has seen it): a run of failed starts
# ends. Pids not the pool's are ignored.
proc ::socketserver::pool::Registered {name pid} {
    upvar #0 ${name}::workers workers ${name}::failedstarts failedstarts
    if {![dict exists $workers $pid] || [dict get $workers $pid registered]} {
        return
    }
    dict set workers $pid registered 1
    set ${name}::proven 1
    if {$failedstarts > 0} {
        Log $name "worker $pid started after $failedstarts failed starts"
        set failedstarts 0
    }
}

# Every pid the dispatcher lists as registered (info's `workers`) that is the pool's. An exec'd
# worker has no pipe to say so: this is how the monitor learns it (see Tick).
proc ::socketserver::pool::Listed {name info} {
    foreach pid [dict get $info workers] {
        Registered $name $pid
    }
}

proc ::socketserver::pool::Retire {name pid} {
    upvar #0 ${name}::workers workers
    if {[dict exists $workers $pid] && [dict get $workers $pid role] ne "retiring"} {
        dict set workers $pid role retiring
        catch {::socketserver::kill TERM $pid}
    }
}

proc ::socketserver::pool::Resize {name count} {
    set active [Active $name]
    set surplus [expr {[llength $active] - $count}]
    # Retire the newest first: the oldest are warm, and the longest-lived are recycled anyway.
    foreach pid [lrange [lreverse $active] 0 [expr {$surplus - 1}]] {
        Retire $name $pid
    }
    Log $name "resize to $count workers"
    Refill $name
}

# Replaces every worker (see ReloadRound).  A reload asked for while one runs (it waits in a
# nested event loop, where a SIGHUP or a timer can ask again) would retire the workers the
# running one is waiting for: a SIGHUP's is coalesced instead, the running reload is followed by
# exactly one more; the method's cannot wait for that (the running reload is below it on the
# stack) and is refused.
proc ::socketserver::pool::Reload {name wait} {
    upvar #0 ${name}::reloading reloading ${name}::stopping stopping
    if {$stopping} {
        Log $name "reload ignored: the pool is stopping" ;# a SIGHUP's: the method refuses earlier
        return
    }
    if {$reloading ne {}} {
        if {$wait} {
            return -code error -errorcode {SOCKETSERVER POOL BUSY} \
                "reload already in progress in pool $name"
        }
        dict set reloading pending 1
        Log $name "reload asked for during a reload: another one follows it"
        return
    }
    set reloading [dict create fresh {} failed 0 pending 0]
    set drained [Drain $name]
    catch {ReloadRound $name $wait} result options
    while {[dict get $reloading pending] && !$stopping} {
        dict set reloading pending 0
        if {[catch {ReloadRound $name 0} error]} {
            Log $name "reload failed: $error"
        }
    }
    set reloading {}
    if {$drained && !$stopping} {
        catch {::socketserver::socket drain [dict get [set ${name}::config] -port] 0}
        Log $name "reload done: no longer draining"
    }
    return -options $options $result
}

# Starts fresh workers, waits until they are registered with the dispatcher, then retires the
# old ones. With wait, returns only when every old worker has exited (so every connection
# accepted after that is served by a new worker). If a fresh worker dies or does not register
# within 10 s (say, the new code fails in -init), the old workers stay and the reload fails.
# Fresh workers retired meanwhile (by a resize) are not waited for; a stop ends the reload.
proc ::socketserver::pool::ReloadRound {name wait} {
    upvar #0 ${name}::workers workers ${name}::reloading reloading ${name}::stopping stopping
    set old [Active $name]
    foreach pid $old {
        dict set workers $pid role old
    }
    Log $name "reload: replacing [llength $old] workers"
    Refill $name
    dict set reloading fresh [Active $name]
    dict set reloading failed 0
    set port [dict get [set ${name}::config] -port]
    WaitFor [expr {[clock milliseconds] + 10000}] {
        $stopping || [dict get $reloading failed] || ![llength [Unregistered $port [Fresh $name]]]
    }
    if {$stopping} {
        Log $name "reload abandoned: the pool was stopped"
        if {$wait} {
            return -code error -errorcode {SOCKETSERVER POOL STOPPED} \
                "reload abandoned: pool $name was stopped"
        }
        return
    }
    if {[dict get $reloading failed] || [llength [Unregistered $port [Fresh $name]]]} {
        foreach pid [Active $name] {
            Retire $name $pid
        }
        foreach pid [Alive $name $old] {
            dict set workers $pid role new
        }
        Log $name "reload failed: the new workers did not start; keeping the old ones"
        Refill $name 1 ;# for old workers that ended during the reload
        if {$wait} {
            return -code error -errorcode {SOCKETSERVER POOL RELOAD} \
                "reload failed: the new workers did not start; the old ones keep serving"
        }
        return
    }
    dict incr ${name}::totals reloads
    foreach pid $old {
        Retire $name $pid
    }
    if {$wait} {
        AwaitExit $name $old [dict get [set ${name}::config] -grace]
    }
}

# The running reload's fresh workers that the pool still wants.
proc ::socketserver::pool::Fresh {name} {
    set workers [set ${name}::workers]
    lmap pid [dict get [set ${name}::reloading] fresh] {
        expr {[dict exists $workers $pid] && [dict get $workers $pid role] eq "new" ? $pid : [continue]}
    }
}

# Runs the event loop until condition (an expression, evaluated in the caller's frame) holds or
# the deadline (ms) passes.
proc ::socketserver::pool::WaitFor {deadline condition} {
    variable wake
    while {![uplevel 1 [list expr $condition]] && [clock milliseconds] < $deadline} {
        set id [after 10 [list set ::socketserver::pool::wake 1]]
        vwait ::socketserver::pool::wake
        after cancel $id
    }
}

# The pids not (yet) registered with the dispatcher of port.
proc ::socketserver::pool::Unregistered {port pids} {
    set registered [dict get [::socketserver::info $port] workers]
    return [lmap pid $pids {expr {$pid in $registered ? [continue] : $pid}}]
}

# The pids the pool has not yet reaped.
proc ::socketserver::pool::Alive {name pids} {
    set workers [set ${name}::workers]
    return [lmap pid $pids {expr {[dict exists $workers $pid] ? $pid : [continue]}}]
}

# Waits up to grace ms for pids to exit, then kills the rest with SIGKILL and waits for them.
proc ::socketserver::pool::AwaitExit {name pids grace} {
    WaitFor [expr {[clock milliseconds] + $grace}] {[llength [Alive $name $pids]] == 0}
    foreach pid [Alive $name $pids] {
        Log $name "worker $pid did not finish within $grace ms: killing it"
        catch {::socketserver::kill KILL $pid}
    }
    WaitFor [expr {[clock milliseconds] + 5000}] {[llength [Alive $name $pids]] == 0}
}

proc ::socketserver::pool::Stop {name grace} {
    upvar #0 ${name}::stopping stopping
    if {$stopping} {
        return
    }
    set stopping 1
    after cancel [set ${name}::tick]
    after cancel [set ${name}::restart]
    set ${name}::restart {}
    set ${name}::backoff 0
    set port [dict get [set ${name}::config] -port]
    # The port is closed with the last pool on it: another pool's workers go on serving it.
    set others [lmap other [Running] {
        expr {$other ne $name && [dict get [set ${other}::config] -port] == $port ? $other : [continue]}
    }]
    if {[llength $others]} {
        Log $name "stopping: the port stays open for [join $others {, }]; waiting up to $grace ms for busy workers"
        Stats $name
    } else {
        if {[Drain $name]} {
            ServeBacklog $name
        }
        Log $name "stopping: no new connections; waiting up to $grace ms for busy workers"
        Stats $name ;# keeps the server's last counts for stats after the stop
        catch {::socketserver::socket close $port}
        dict set ${name}::counts parked 0 ;# closing the server closed them
    }
    set pids [dict keys [set ${name}::workers]]
    foreach pid $pids {
        Retire $name $pid
    }
    AwaitExit $name $pids $grace
    variable running
    set running [lsearch -all -inline -exact -not $running $name]
    if {![llength $running]} {
        ::socketserver::trap CHLD {}
    }
    # The signal traps serve every pool with -signals: removed with the last of them.
    if {[dict get [set ${name}::config] -signals] && ![llength [SignalPools]]} {
        foreach signal {TERM INT HUP} {
            ::socketserver::trap $signal {}
        }
    }
    foreach chan [list {*}[set ${name}::lifeline] {*}[set ${name}::started]] {
        catch {close $chan}
    }
    Log $name "stopped"
    set ${name}::stopped 1
}

# With an agent on the pool's port and -draintime > 0: sets the drain state, so the agent
# answers `drain`, and waits until it has said so at least once (a balancer asked, and stops
# sending new connections once it has read the answer), or -draintime ms have passed. Returns 1
# if it set the drain state.
proc ::socketserver::pool::Drain {name} {
    set config [set ${name}::config]
    set port [dict get $config -port]
    set ms [dict get $config -draintime]
    if {$ms == 0 || [catch {::socketserver::info $port} info] || [dict get $info agentport] == 0
            || [catch {::socketserver::socket drain $port 1}]} {
        return 0
    }
    # Counted from the snapshot after the drain was set: every `drain` answer after it is new.
    set before [AgentDrains $port]
    Log $name "draining: waiting up to $ms ms for a balancer to ask the agent"
    WaitFor [expr {[clock milliseconds] + $ms}] {[AgentDrains $port] > $before}
    if {[AgentDrains $port] > $before} {
        Log $name "drain: a balancer was told"
    } else {
        Log $name "drain: no balancer asked within $ms ms"
    }
    return 1
}

proc ::socketserver::pool::AgentDrains {port} {
    if {[catch {dict get [::socketserver::info $port] agentdrains} n]} {
        return 0
    }
    return $n
}

# After a drain was heard: serves what the balancer sent before it read the answer (connections
# in the listen queue would be reset by the close) until nothing is waiting, a worker is ready
# and no connection came since the last look (10 ms before), at most -draintime ms.
proc ::socketserver::pool::ServeBacklog {name} {
    set config [set ${name}::config]
    set port [dict get $config -port]
    set last -1
    WaitFor [expr {[clock milliseconds] + [dict get $config -draintime]}] {
        [::socketserver::pool::Settled $port last]
    }
}

# Whether the dispatcher of port has a ready worker, nothing queued, and has accepted nothing
# since the count in the caller's variable lastVar (which it updates).
proc ::socketserver::pool::Settled {port lastVar} {
    upvar 1 $lastVar last
    if {[catch {::socketserver::info $port} info]} {
        return 1
    }
    set accepted [dict get $info accepted]
    set settled [expr {$accepted == $last && [dict get $info ready] > 0 && [dict get $info queued] == 0}]
    set last $accepted
    return $settled
}

# The running pools created with -signals 1.
proc ::socketserver::pool::SignalPools {} {
    variable running
    lmap name $running {expr {[dict get [set ${name}::config] -signals] ? $name : [continue]}}
}

# The pools not yet stopped (nor stopping).
proc ::socketserver::pool::Running {} {
    variable running
    lmap name $running {expr {[set ${name}::stopping] ? [continue] : $name}}
}

# SIGTERM and SIGINT stop, SIGHUP reloads, every pool created with -signals 1.
proc ::socketserver::pool::OnSignal {signal} {
    foreach name [SignalPools] {
        if {$signal eq "HUP"} {
            Reload $name 0
        } else {
            Log $name "SIG$signal received"
            Stop $name [dict get [set ${name}::config] -grace]
        }
    }
}

proc ::socketserver::pool::ReapAll {} {
    variable running
    foreach name $running {
        Reap $name
    }
}

# SIGCHLD: reap every ended child of ours, say why it ended, and replace it.
proc ::socketserver::pool::Reap {name} {
    upvar #0 ${name}::workers workers ${name}::reloading reloading
    # A worker that registered just before it ended has said so: read that first (an exec'd one
    # may still be listed by the dispatcher).
    Started $name
    set config [set ${name}::config]
    if {[dict get $config -exec] ne {} && ![catch {::socketserver::info [dict get $config -port]} info]} {
        Listed $name $info
    }
    # Only our own pids: waiting for any child would steal the ones `exec` waits for.
    foreach pid [dict keys $workers] {
        if {![dict exists $workers $pid]} {
            continue ;# reaped meanwhile, by a Reap nested in a -log command's event loop
        }
        if {[catch {::socketserver::wait -nohang $pid} ended options]} {
            if {[lindex [dict get $options -errorcode] 1] ne "ECHILD"} {
                continue
            }
            set ended [list $pid EXIT unknown] ;# reaped by someone else
        } elseif {$ended eq {}} {
            continue
        }
        lassign $ended pid how detail
        if {![dict get $workers $pid registered]} {
            # It may have registered (and written its pid) after the pipe was read above, and
            # ended since: what it wrote is there now that it has ended.
            Started $name
        }
        set worker [dict get $workers $pid]
        set lifetime [expr {[clock milliseconds] - [dict get $worker started]}]
        dict unset workers $pid
        if {[dict get $worker role] ne "new"} {
            continue ;# retired on purpose
        }
        set why [expr {$how eq "EXIT" ? "exited with code $detail" : "was killed by $detail"}]
        # An exec'd worker can register, serve its -maxconnections and exit between two looks at
        # the dispatcher's list: its exit 0 is trusted once the program has shown it registers.
        set done [expr {$how eq "EXIT" && $detail eq "0"}]
        set trusted [expr {$done && [dict get $worker max] > 0 && [set ${name}::proven]
                           && [dict get [set ${name}::config] -exec] ne {}}]
        # Killed from outside (an operator, -timeout) is not the worker's failure to start.
        if {![dict get $worker registered] && $detail ni {SIGKILL SIGTERM} && !$trusted} {
            dict incr ${name}::totals respawned
            FailedStart $name "worker $pid $why after $lifetime ms, before it registered"
        } elseif {$done} {
            dict incr ${name}::totals recycled
            Log $name "worker $pid retired after -maxconnections: replacing it"
            continue
        } else {
            dict incr ${name}::totals respawned
            Log $name "worker $pid $why after $lifetime ms: replacing it"
        }
        if {$reloading ne {} && $pid in [dict get $reloading fresh]} {
            dict set reloading failed 1
        }
    }
    Refill $name 1
}

# Every 100 ms: notes which workers have registered, enforces -timeout on busy workers and, for
# exec'd workers, -maxconnections (see Recycle). Every 10 ms while an exec'd worker is starting:
# the dispatcher's list is the only sign that it has registered, and one that serves its
# -maxconnections and exits between two looks would pass for a worker that failed to start.
proc ::socketserver::pool::Tick {name} {
    set config [set ${name}::config]
    set timeout [dict get $config -timeout]
    set exec [expr {[dict get $config -exec] ne {}}]
    # A forked pool without -timeout has nothing to ask the dispatcher.
    if {($exec || $timeout > 0) && ![catch {::socketserver::info [dict get $config -port]} info]} {
        if {$exec} {
            Listed $name $info
        }
        dict for {pid status} [dict get $info status] {
            if {$timeout > 0 && [dict get $status state] eq "busy" && [dict get $status busy_ms] > $timeout
                    && [dict exists [set ${name}::workers] $pid]} {
                Log $name "worker $pid busy for over $timeout ms: killing it"
                dict incr ${name}::totals timeouts
                catch {::socketserver::kill KILL $pid}
            }
        }
        if {$exec} {
            Recycle $name $info
        }
    }
    upvar #0 ${name}::tick tick
    after cancel $tick ;# the one a Hurry during this Tick scheduled, if any
    if {[set ${name}::stopping]} {
        return
    }
    set ms [expr {[llength [Starting $name]] ? 10 : 100}]
    set tick [after $ms [list ::socketserver::pool::Tick $name]]
}

# The next Tick in 10 ms: an exec'd worker has just been started.
proc ::socketserver::pool::Hurry {name} {
    upvar #0 ${name}::tick tick
    if {![set ${name}::stopping] && $tick ne {}} {
        after cancel $tick
        set tick [after 10 [list ::socketserver::pool::Tick $name]]
    }
}

# The exec'd workers started in the last 10 s (as long as a reload waits for them) that have
# not been seen registered.
proc ::socketserver::pool::Starting {name} {
    if {[dict get [set ${name}::config] -exec] eq {}} {
        return {}
    }
    set since [expr {[clock milliseconds] - 10000}]
    set starting {}
    dict for {pid worker} [set ${name}::workers] {
        if {![dict get $worker registered] && [dict get $worker role] ne "retiring"
                && [dict get $worker started] > $since} {
            lappend starting $pid
        }
    }
    return $starting
}

# -maxconnections for exec'd workers. Each is told its limit (SOCKETSERVER_MAXCONNECTIONS) and
# should exit 0 after it, as a forked one does; one that has taken that many connections (info's
# `delivered`) and is not busy is retired: a program that ignores the variable is recycled too.
proc ::socketserver::pool::Recycle {name info} {
    upvar #0 ${name}::workers workers
    set retired 0
    dict for {pid status} [dict get $info status] {
        if {![dict exists $workers $pid]} {
            continue
        }
        set max [dict get $workers $pid max]
        if {$max > 0 && [dict get $workers $pid role] eq "new" && [dict get $status delivered] >= $max
                && [dict get $status state] ne "busy"} {
            Log $name "worker $pid has taken its $max connections (-maxconnections): retiring it"
            dict incr ${name}::totals recycled
            Retire $name $pid
            incr retired
        }
    }
    if {$retired} {
        Refill $name 1
    }
}

proc ::socketserver::pool::Stats {name} {
    set config [set ${name}::config]
    set port [dict get $config -port]
    set status {}
    # After stop the server is gone: report its last counts.
    if {![catch {::socketserver::info $port} info]} {
        set status [dict get $info status]
        set ${name}::counts [dict merge [set ${name}::counts] \
                                 [dict filter $info key {*}[dict keys [set ${name}::counts]]]]
    }
    set workers {}
    dict for {pid worker} [set ${name}::workers] {
        set served 0
        set state starting
        if {[dict exists $status $pid]} {
            set served [dict get $status $pid delivered]
            set state [dict get $status $pid state]
            if {$state eq "idle"} {
                set state starting ;# registered, has not asked for a connection yet
            }
        }
        if {[dict get $worker role] ne "new"} {
            set state retiring
        }
        dict set workers $pid [dict create state $state served $served started [dict get $worker started]]
    }
    return [dict merge [dict create port $port size [dict get $config -workers] workers $workers] \
        [set ${name}::counts] [set ${name}::totals] \
        [dict create failedstarts [set ${name}::failedstarts] backoff [set ${name}::backoff]]]
}

# ---- the worker side -------------------------------------------------------------------------

# A forked worker (see Fork).
proc ::socketserver::pool::WorkerMain {name} {
    set config [set ${name}::config]
    # What the monitor had scheduled, trapped or opened is not the worker's business: its timers
    # and file events would run here too, and read what the monitor should.
    foreach id [after info] {
        after cancel $id
    }
    set lifeline [set ${name}::lifeline]
    set started [lindex [set ${name}::started] 1]
    foreach chan [chan names] {
        if {$chan ni [list stdin stdout stderr [lindex $lifeline 0] $started]} {
            catch {chan event $chan readable {}}
            catch {chan event $chan writable {}}
            catch {chan configure $chan -blocking 0}
            catch {close $chan}
        }
    }
    # Then, with the monitor's listening sockets closed, and before anything below makes a file
    # handler.
    if {[dict get $config -notifier] eq "poll" && [catch {::socketserver::notifier poll} error]} {
        Log $name "worker [pid]: keeps Tcl's notifier: $error"
    }
    # Only the monitor holds the lifeline's write end now: if the monitor dies, retire.
    chan event [lindex $lifeline 0] readable [list apply {{chan} {
        chan event $chan readable {}
        ::socketserver::pool::WorkerRetire
    }} [lindex $lifeline 0]]
    ::socketserver::trap CHLD {}
    ::socketserver::trap HUP {}
    ::socketserver::trap INT {#} ;# Ctrl-C reaches the whole process group: the monitor decides
    ::socketserver::trap TERM [list ::socketserver::pool::WorkerRetire]
    WorkerInit [list ::socketserver::socket client -port [dict get $config -port]] \
        [set ${name}::handler] [dict get $config -maxconnections]
    set code 0
    if {[catch {uplevel #0 [dict get $config -init]} error options]} {
        Log $name "worker [pid]: -init failed: $error"
        set code 1
    } elseif {[catch {WorkerArm} error options]} {
        Log $name "worker [pid]: $error"
        set code 1
    } else {
        # Registered: tell the monitor (one short write, atomic on a pipe), then let the pipe go.
        catch {
            chan configure $started -blocking 0
            puts $started [pid]
            close $started
        }
        vwait ::socketserver::pool::worker_done
        set code $::socketserver::pool::worker_done
    }
    exit $code
}

# Usage: ::socketserver::pool worker ?-path path? ?-maxconnections n? ?-notifier poll|tcl? handler
# A worker in a process of its own (a pool's -exec program, or one started by hand): registers at
# the server's path and serves one connection at a time, as a forked worker does, until it
# retires (SIGTERM, SIGINT), has served -maxconnections, or the server is gone. Returns which:
# retired, maxconnections or closed. A failure to register is an error.
proc ::socketserver::pool::worker {args} {
    variable worker
    if {[llength $args] % 2 == 0} {
        return -code error -errorcode {TCL WRONGARGS} \
            "wrong # args: should be \"::socketserver::pool worker ?-path path? ?-maxconnections n? ?-notifier poll|tcl? handler\""
    }
    if {[info exists worker] && [dict get $worker running]} {
        return -code error -errorcode {SOCKETSERVER POOL BUSY} "a pool worker is already running in this interpreter"
    }
    set handler [lindex $args end]
    CheckPrefix handler $handler
    # The defaults, from a pool's environment, are checked as given options are.
    set defaults [list -path {} -maxconnections 0 -notifier poll]
    foreach {option variable} {-path SOCKETSERVER_PATH -maxconnections SOCKETSERVER_MAXCONNECTIONS} {
        if {[info exists ::env($variable)]} {
            dict set defaults $option $::env($variable)
        }
    }
    set config [ParseOptions {} [list {*}$defaults {*}[lrange $args 0 end-1]] workeroptions]
    set path [dict get $config -path]
    if {$path eq {}} {
        return -code error -errorcode {SOCKETSERVER POOL NOPATH} \
            "no registration path: give -path or set SOCKETSERVER_PATH"
    }
    if {[dict get $config -notifier] eq "poll" && [catch {::socketserver::notifier poll} error]} {
        LogToStderr "worker [pid]: keeps Tcl's notifier: $error"
    }
    set traps {}
    foreach signal {TERM INT} {
        dict set traps $signal [::socketserver::trap $signal]
        ::socketserver::trap $signal [list ::socketserver::pool::WorkerRetire retired]
    }
    WorkerInit [list ::socketserver::socket client -path $path \
                    -onclose [list ::socketserver::pool::WorkerRetire closed]] \
        $handler [dict get $config -maxconnections]
    set failed [catch {WorkerArm} error options]
    if {!$failed} {
        vwait ::socketserver::pool::worker_done
        WorkerLeave $path
    }
    dict set worker running 0
    dict for {signal script} $traps {
        ::socketserver::trap $signal $script
    }
    if {$failed} {
        return -options $options $error
    }
    return [dict get $worker reason]
}

# Ends the registration at path, if it is still there: what the dispatcher may already have sent
# goes to another worker, and no more comes while the caller of `pool worker` goes on.
proc ::socketserver::pool::WorkerLeave {path} {
    if {![catch {::socketserver::info} info] && [dict get $info role] eq "worker"
            && [dict get $info path] eq [file normalize $path]} {
        catch {::socketserver::socket close [dict get $info port]}
    }
}

# The worker's state: arm is the `socket client` command (without the handler) that asks for the
# next connection.
proc ::socketserver::pool::WorkerInit {arm handler max} {
    variable worker [dict create arm $arm handler $handler max $max served 0 busy 0 retiring 0 \
                         reason {} running 1]
    unset -nocomplain ::socketserver::pool::worker_done
}

proc ::socketserver::pool::WorkerArm {} {
    variable worker
    {*}[dict get $worker arm] ::socketserver::pool::WorkerServe
}

# The worker is done, for reason (the first one given counts).
proc ::socketserver::pool::WorkerDone {reason} {
    variable worker
    if {[dict get $worker reason] eq {}} {
        dict set worker reason $reason
    }
    set ::socketserver::pool::worker_done 0
}

proc ::socketserver::pool::WorkerServe {chan ip port} {
    variable worker
    dict incr worker served
    dict set worker busy 1
    ::socketserver::onclose $chan ::socketserver::pool::WorkerFinished
    if {[catch {uplevel #0 [list {*}[dict get $worker handler] $chan $ip $port]} error options]} {
        # The channel is closed so that the worker can take the next connection.
        catch {close $chan}
        return -options $options $error
    }
}

proc ::socketserver::pool::WorkerFinished {} {
    variable worker
    dict set worker busy 0
    set max [dict get $worker max]
    if {[dict get $worker retiring]} {
        WorkerDone retired
    } elseif {$max > 0 && [dict get $worker served] >= $max} {
        WorkerDone maxconnections
    } elseif {[catch WorkerArm]} {
        WorkerDone closed
    }
}

# SIGTERM, the monitor's death (the lifeline) or, for a worker of its own (`pool worker`),
# SIGINT or the server's end (reason closed): finish the connection in hand, then exit.
proc ::socketserver::pool::WorkerRetire {{reason retired}} {
    variable worker
    dict set worker retiring 1
    if {[dict get $worker reason] eq {}} {
        dict set worker reason $reason
    }
    # A stop closes the server before it signals: a connection the dispatcher already sent to
    # this idle worker waits in its mailbox, and nobody else would serve it. Take it first.
    update
    if {![dict get $worker busy]} {
        WorkerDone $reason
    }
}
