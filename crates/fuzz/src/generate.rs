//! Structure-aware inputs: documents of the right shape for each target with hostile values in their leaves
//! (edge numbers, malformed and overlapping addresses, oversized names), so that generation reaches past the
//! parser into what consumes it. Plus [`input`]: for a target, a mix of raw bytes, mutated corpus seeds and
//! structured documents.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::mutate::{self, Op};

/// Strings the schemas care about, and strings nothing should trust.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "", "eth0", "eth1", "net1", "ul0123456789a", "ul0000000000z", "abc123", "fuzz0", "c-1.x_2",
            "a-very-long-ifname0", "../etc", ".", "..", "a:b", "a b", "x\u{0}y", "ü", "default", "web-0",
            "routed", "eni", "ROUTED", "underlay", "underlay-cni", "/var/run/netns/p1", "1.1.0", "1.0.0",
            "0.4.0", "0.3.1", "9.9.9", "1.0", "x.y.z", "error", "debug", "verbose",
        ])
        .prop_map(str::to_string),
        2 => cidr(),
        2 => address(),
        1 => "[ -~]{0,20}",
        1 => any::<String>(),
    ]
}

/// An IPv4 address as text, mostly near the lab's ranges, sometimes malformed.
pub fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (
            prop::sample::select(vec![0u16, 10, 100, 169, 198, 255]),
            prop::sample::select(vec![0u16, 18, 19, 64, 254, 255]),
            prop::sample::select(vec![0u16, 1, 2, 255]),
            prop::sample::select(vec![0u16, 1, 2, 5, 10, 255]),
        )
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        1 => prop::sample::select(vec!["1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "-1.0.0.0", " 1.2.3.4", "::1"])
            .prop_map(str::to_string),
    ]
}

/// A CIDR as text: any prefix length 0..=33 on an address of [`address`].
pub fn cidr() -> impl Strategy<Value = String> {
    (address(), prop_oneof![3 => 0u8..=33, 1 => Just(255u8)]).prop_map(|(a, p)| format!("{a}/{p}"))
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(10),
            json!(26),
            json!(28),
            json!(32),
            json!(67),
            json!(68),
            json!(576),
            json!(1500),
            json!(9001),
            json!(65535),
            json!(65536),
            json!(u32::MAX),
            json!(u64::from(u32::MAX) + 1),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(0.5),
            json!(1e300),
        ]),
        any::<u32>().prop_map(|n| json!(n)),
    ]
}

/// Any leaf: null, a boolean, a number or a string.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => number(),
        5 => text().prop_map(Value::String),
    ]
}

/// A value for a field that expects `good`: mostly `good`, sometimes any leaf or a list or an object.
fn field(good: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    prop_oneof![
        8 => good,
        2 => leaf(),
        1 => vec(leaf(), 0..3).prop_map(Value::Array),
        1 => Just(json!({})),
    ]
    .boxed()
}

fn s(strategy: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Value> {
    strategy.prop_map(Value::String).boxed()
}

fn n(strategy: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    strategy.boxed()
}

/// An object with each of `fields` present or absent.
fn object(fields: Vec<(&'static str, BoxedStrategy<Value>)>) -> BoxedStrategy<Value> {
    let (names, values): (Vec<&'static str>, Vec<_>) = fields.into_iter().unzip();
    let values: Vec<_> = values
        .into_iter()
        .map(|v| option::weighted(0.85, field(v)))
        .collect();
    values
        .prop_map(move |vals| {
            let mut m = serde_json::Map::new();
            for (k, v) in names.iter().zip(vals) {
                if let Some(v) = v {
                    m.insert((*k).to_string(), v);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

fn version() -> BoxedStrategy<Value> {
    s(
        prop::sample::select(vec!["1.1.0", "1.0.0", "0.4.0", "0.3.1", "2.0.0", "1.1", ""])
            .prop_map(str::to_string),
    )
}

fn prev_result() -> BoxedStrategy<Value> {
    let iface = object(vec![
        ("name", s(text())),
        ("mac", s(text())),
        ("sandbox", s(text())),
    ]);
    let ip = object(vec![
        ("address", s(cidr())),
        ("gateway", s(address())),
        ("interface", n(number())),
        ("version", s(Just("4".to_string()))),
    ]);
    object(vec![
        ("cniVersion", version()),
        (
            "interfaces",
            vec(iface, 0..4).prop_map(Value::Array).boxed(),
        ),
        ("ips", vec(ip, 0..4).prop_map(Value::Array).boxed()),
        (
            "routes",
            vec(object(vec![("dst", s(cidr())), ("gw", s(address()))]), 0..3)
                .prop_map(Value::Array)
                .boxed(),
        ),
        (
            "dns",
            Just(json!({"nameservers": ["203.0.113.53"]})).boxed(),
        ),
    ])
}

fn net_conf() -> BoxedStrategy<Value> {
    let attachment = object(vec![("containerID", s(text())), ("ifname", s(text()))]);
    object(vec![
        ("cniVersion", version()),
        ("name", s(text())),
        ("type", s(Just("underlay-cni".to_string()))),
        ("mtu", n(number())),
        ("socket", s(text())),
        ("logLevel", s(text())),
        ("prevResult", prev_result()),
        (
            "cni.dev/valid-attachments",
            vec(attachment, 0..4).prop_map(Value::Array).boxed(),
        ),
    ])
}

fn cni_env() -> impl Strategy<Value = String> {
    let command = prop_oneof![
        5 => prop::sample::select(vec!["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"]).prop_map(str::to_string),
        1 => text(),
    ];
    (
        command,
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(text()),
    )
        .prop_map(|(cmd, id, netns, ifname, args)| {
            let mut env = format!("CNI_COMMAND={cmd}\n");
            for (k, v) in [
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
            ] {
                if let Some(v) = v {
                    env.push_str(&format!("{k}={}\n", v.replace('\n', "")));
                }
            }
            env
        })
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).expect("a JSON value serializes")
}

fn yaml_bytes(v: &Value) -> Vec<u8> {
    serde_yaml::to_string(v)
        .expect("a JSON value is YAML")
        .into_bytes()
}

/// `cni_invocation`: an environment and a network configuration.
pub fn cni_invocation() -> BoxedStrategy<Vec<u8>> {
    (cni_env(), net_conf())
        .prop_map(|(env, conf)| {
            let mut out = env.into_bytes();
            out.push(b'\n');
            out.extend(json_bytes(&conf));
            out
        })
        .boxed()
}

/// `cni_conflist`: a list of entries, ours among others.
pub fn cni_conflist() -> BoxedStrategy<Vec<u8>> {
    (version(), s(text()), vec(net_conf(), 0..4))
        .prop_map(|(v, name, plugins)| {
            json_bytes(&json!({"cniVersion": v, "name": name, "plugins": plugins}))
        })
        .boxed()
}

fn wire_key() -> impl Strategy<Value = Option<underlay_ipam_api::AttachmentKey>> {
    let id = prop::sample::select(vec!["c0", "c1", "c2", "c3", "", "x/../y", "ul0123456789a"]);
    let ifname = prop::sample::select(vec!["eth0", "eth1", "", "a-very-long-ifname0", "a:b", "."]);
    option::weighted(
        0.9,
        (id, ifname).prop_map(|(c, i)| underlay_ipam_api::AttachmentKey::new(c, i)),
    )
}

fn request() -> impl Strategy<Value = underlay_ipam_api::pb::Request> {
    use underlay_ipam_api::pb::{self, request::Method};
    let allocate = (wire_key(), text(), text(), text()).prop_map(|(key, netns, ns, name)| {
        Method::Allocate(pb::AllocateRequest {
            key,
            netns,
            pod_namespace: ns,
            pod_name: name,
        })
    });
    let host_ifname = prop_oneof![
        Just(String::new()),
        Just("ul0123456789a".to_string()),
        text()
    ];
    let release = (wire_key(), any::<u32>(), host_ifname).prop_map(|(key, idx, name)| {
        Method::Release(pb::ReleaseRequest {
            key,
            host_ifindex: idx,
            host_ifname: name,
        })
    });
    let gc = vec(wire_key(), 0..5).prop_map(|keys| {
        Method::Gc(pb::GcRequest {
            valid: keys.into_iter().flatten().collect(),
        })
    });
    let method = prop_oneof![
        6 => allocate,
        4 => release,
        1 => Just(Method::List(pb::ListRequest {})),
        2 => gc,
    ];
    option::weighted(0.95, method).prop_map(|method| pb::Request { method })
}

/// `ipam_frames`: a pool selector, then a conversation of well-framed requests, sometimes cut or misframed.
pub fn ipam_frames() -> BoxedStrategy<Vec<u8>> {
    (
        any::<u8>(),
        vec(request(), 0..24),
        option::weighted(0.1, any::<u32>()),
    )
        .prop_map(|(selector, reqs, bad_header)| {
            let mut out = vec![selector];
            for r in &reqs {
                out.extend(underlay_ipam_api::wire::encode_frame(r));
            }
            if let Some(h) = bad_header {
                out.extend(h.to_be_bytes());
                out.extend([0x0a, 0x00]);
            }
            out
        })
        .boxed()
}

fn pool_address_ip() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (0u8..12).prop_map(|d| format!("100.64.1.{d}")),
        1 => address(),
    ]
    .prop_map(Value::String)
    .boxed()
}

/// `checkpoint`: a checkpoint file whose allocations collide, cool and point anywhere.
pub fn checkpoint() -> BoxedStrategy<Vec<u8>> {
    let key = object(vec![
        (
            "container_id",
            s(
                prop::sample::select(vec!["c0", "c1", "c2", "", "ul0123456789a"])
                    .prop_map(str::to_string),
            ),
        ),
        (
            "ifname",
            s(prop::sample::select(vec!["eth0", "eth1", ""]).prop_map(str::to_string)),
        ),
    ]);
    let egress = object(vec![("interface", s(text())), ("route_table", n(number()))]);
    let allocation = object(vec![
        ("key", key),
        ("address", pool_address_ip()),
        ("netns", s(text())),
        ("pod_name", s(text())),
        ("egress", egress),
    ]);
    let cooling = object(vec![
        ("address", pool_address_ip()),
        ("until_unix_ms", n(number())),
    ]);
    object(vec![
        (
            "version",
            n(prop_oneof![3 => Just(json!(1)), 1 => number()]),
        ),
        (
            "allocations",
            vec(allocation, 0..6).prop_map(Value::Array).boxed(),
        ),
        ("cooling", vec(cooling, 0..4).prop_map(Value::Array).boxed()),
        ("cursor", n(number())),
    ])
    .prop_map(|v| json_bytes(&v))
    .boxed()
}

/// `agent_config`: an agent configuration, or a routed node record file (both YAML).
pub fn agent_config() -> BoxedStrategy<Vec<u8>> {
    let pool_address = object(vec![
        ("address", s(address())),
        ("egress_interface", s(text())),
        ("route_table", n(number())),
    ]);
    let pool = object(vec![
        ("block", s(cidr())),
        (
            "addresses",
            vec(pool_address, 0..4).prop_map(Value::Array).boxed(),
        ),
    ]);
    let config = object(vec![
        ("pool", pool),
        ("cooldown_secs", n(number())),
        ("mtu", n(number())),
        ("socket", s(text())),
        ("reap_links", any::<bool>().prop_map(Value::Bool).boxed()),
        ("reclaim_interval_secs", n(number())),
        ("reclaim_grace_secs", n(number())),
    ]);
    let peer = object(vec![
        ("destination", s(cidr())),
        ("via", s(address())),
        ("peer", s(text())),
    ]);
    let record = object(vec![
        ("node", s(text())),
        ("subnet", s(text())),
        ("node_ip", s(address())),
        ("uplink", s(text())),
        ("pod_block", s(cidr())),
        ("pod_cidr", s(cidr())),
        (
            "vpc_cidrs",
            vec(s(cidr()), 0..3).prop_map(Value::Array).boxed(),
        ),
        (
            "peer_routes",
            vec(peer, 0..4).prop_map(Value::Array).boxed(),
        ),
        ("mtu", n(number())),
    ]);
    prop_oneof![config, record]
        .prop_map(|v| yaml_bytes(&v))
        .boxed()
}

/// `node_record`: an `UnderlayNode` in either mode, its pool and routes full of edge values.
pub fn node_record() -> BoxedStrategy<Vec<u8>> {
    let eni = object(vec![
        (
            "id",
            s(prop::sample::select(vec!["eni-1", "eni-2", ""]).prop_map(str::to_string)),
        ),
        ("deviceIndex", n(number())),
        (
            "mac",
            s(prop_oneof![
                Just("02:aa:00:00:00:01".to_string()),
                Just("02:AA:00:00:00:02".to_string()),
                text()
            ]),
        ),
        ("subnetCidr", s(cidr())),
        ("primaryIp", s(address())),
        (
            "addresses",
            vec(s(address()), 0..4).prop_map(Value::Array).boxed(),
        ),
        (
            "prefixes",
            vec(s(cidr()), 0..3).prop_map(Value::Array).boxed(),
        ),
        (
            "releasingAddresses",
            vec(s(address()), 0..2).prop_map(Value::Array).boxed(),
        ),
    ]);
    let pool = object(vec![
        ("block", s(cidr())),
        ("enis", vec(eni, 0..3).prop_map(Value::Array).boxed()),
        ("releaseGeneration", n(number())),
    ]);
    let route = object(vec![("destination", s(cidr())), ("via", s(address()))]);
    let status = object(vec![
        ("pool", pool),
        ("poolSize", n(number())),
        ("routes", vec(route, 0..4).prop_map(Value::Array).boxed()),
        ("observedGeneration", n(number())),
    ]);
    let spec = object(vec![
        ("instanceId", s(text())),
        ("subnetId", s(text())),
        ("zone", s(text())),
        (
            "mode",
            s(prop::sample::select(vec!["routed", "eni", "Routed"]).prop_map(str::to_string)),
        ),
        ("nodeIP", s(address())),
        ("primaryEniId", s(text())),
    ]);
    (s(text()), option::of("[a-f0-9-]{1,8}"), spec, status)
        .prop_map(|(name, uid, spec, status)| {
            json_bytes(&json!({
                "apiVersion": "underlay.dev/v1alpha1",
                "kind": "UnderlayNode",
                "metadata": {"name": name, "uid": uid},
                "spec": spec,
                "status": status,
            }))
        })
        .boxed()
}

/// `plan_topology`: a small VPC whose ids cross-reference (so many topologies plan), with edge sizes.
pub fn plan_topology() -> BoxedStrategy<Vec<u8>> {
    let subnet_id =
        || prop::sample::select(vec!["s-a", "s-b", "s-c", "s-x"]).prop_map(str::to_string);
    let subnet = (subnet_id(), prop::sample::select(vec!["z1", "z2"]), 0u8..4, prop::sample::select(vec![20u8, 24, 26, 28, 32, 8]))
        .prop_map(|(id, zone, i, p)| json!({"id": id, "zone": zone, "cidr": format!("198.18.{}.0/{p}", i * 16)}));
    let foreign = (cidr(), text()).prop_map(|(d, t)| json!({"destination": d, "target": t}));
    let table = (
        prop::sample::select(vec!["rtb-1", "rtb-2", "rtb-1"]),
        vec(subnet_id(), 0..3),
        prop_oneof![Just(0u32), Just(1), Just(2), 3u32..20, Just(1000), Just(u32::MAX)],
        vec(foreign, 0..3),
    )
        .prop_map(|(id, subnets, limit, foreign)| {
            json!({"id": id, "subnets": subnets, "route_limit": limit, "foreign_routes": foreign})
        });
    let node = (0u8..12, subnet_id(), 0u8..4, 0u8..40, any::<bool>()).prop_map(|(i, s, net, host, healthy)| {
        json!({"id": format!("n{i}"), "subnet": s, "ip": format!("198.18.{}.{}", net * 16, host), "eni": format!("eni-{i}"), "healthy": healthy})
    });
    let pod_cidr = prop_oneof![
        3 => Just("100.64.0.0/16".to_string()),
        1 => Just("100.64.0.0/24".to_string()),
        1 => cidr(),
    ];
    (
        pod_cidr,
        prop_oneof![3 => 24u8..=28, 1 => 0u8..=40],
        prop_oneof![Just(0u32), Just(1), Just(2), Just(u32::MAX)],
        vec(subnet, 1..5),
        vec(table, 1..3),
        vec(node, 0..14),
    )
        .prop_map(|(pod_cidr, blen, headroom, subnets, tables, nodes)| {
            yaml_bytes(&json!({
                "cluster": {"pod_cidr": pod_cidr, "block_prefix_len": blen, "headroom": headroom},
                "vpc": {"id": "vpc-1", "subnets": subnets, "route_tables": tables},
                "nodes": nodes,
            }))
        })
        .boxed()
}

fn label_selector() -> BoxedStrategy<Value> {
    let key = || {
        prop::sample::select(vec![
            "pod",
            "kubernetes.io/metadata.name",
            "tier",
            "",
            "a/b/c",
            "x y",
        ])
        .prop_map(str::to_string)
    };
    let value = || {
        prop::sample::select(vec!["a", "b", "x", "y", "frontend", "", "-bad-"])
            .prop_map(str::to_string)
    };
    let labels = proptest::collection::btree_map(key(), value(), 0..3)
        .prop_map(|m| json!(m))
        .boxed();
    let requirement = object(vec![
        ("key", s(key())),
        (
            "operator",
            s(
                prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Gt", ""])
                    .prop_map(str::to_string),
            ),
        ),
        (
            "values",
            vec(s(value()), 0..3).prop_map(Value::Array).boxed(),
        ),
    ]);
    object(vec![
        ("matchLabels", labels),
        (
            "matchExpressions",
            vec(requirement, 0..3).prop_map(Value::Array).boxed(),
        ),
    ])
}

fn policy_peer() -> BoxedStrategy<Value> {
    let ip_block = object(vec![
        ("cidr", s(cidr())),
        (
            "except",
            vec(s(cidr()), 0..3).prop_map(Value::Array).boxed(),
        ),
    ]);
    object(vec![
        ("podSelector", label_selector()),
        ("namespaceSelector", label_selector()),
        ("ipBlock", ip_block),
    ])
}

fn policy_port() -> BoxedStrategy<Value> {
    let port = prop_oneof![
        3 => prop::sample::select(vec![0i64, 1, 80, 81, 65535, 65536, -1]).prop_map(|n| json!(n)),
        2 => prop::sample::select(vec!["serve-80-tcp", "serve-81-udp", "serve-80-sctp", "http", "", "80"]).prop_map(|n| json!(n)),
    ];
    object(vec![
        (
            "protocol",
            s(
                prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP", "tcp"])
                    .prop_map(str::to_string),
            ),
        ),
        ("port", port.boxed()),
        (
            "endPort",
            n(prop::sample::select(vec![
                json!(0),
                json!(79),
                json!(81),
                json!(65535),
                json!(70000),
                json!(-5),
            ])),
        ),
    ])
}

fn policy_rule(peers: &'static str) -> BoxedStrategy<Value> {
    object(vec![
        (
            peers,
            vec(policy_peer(), 0..3).prop_map(Value::Array).boxed(),
        ),
        (
            "ports",
            vec(policy_port(), 0..3).prop_map(Value::Array).boxed(),
        ),
    ])
}

/// `network_policy`: a NetworkPolicy with selectors, ipBlocks and ports full of edge values.
pub fn network_policy() -> BoxedStrategy<Vec<u8>> {
    let types = vec(
        prop::sample::select(vec!["Ingress", "Egress", "Both"]).prop_map(|t| json!(t)),
        0..3,
    )
    .prop_map(Value::Array)
    .boxed();
    let spec = object(vec![
        ("podSelector", label_selector()),
        ("policyTypes", types),
        (
            "ingress",
            vec(policy_rule("from"), 0..3)
                .prop_map(Value::Array)
                .boxed(),
        ),
        (
            "egress",
            vec(policy_rule("to"), 0..3).prop_map(Value::Array).boxed(),
        ),
    ]);
    (
        prop::sample::select(vec!["x", "y", "z", ""]),
        spec,
        any::<bool>(),
    )
        .prop_map(|(ns, spec, as_json)| {
            let v = json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "p", "namespace": ns},
                "spec": spec,
            });
            if as_json {
                json_bytes(&v)
            } else {
                yaml_bytes(&v)
            }
        })
        .boxed()
}

/// The structured generator of the target called `name` (every target has one).
pub fn structured(name: &str) -> BoxedStrategy<Vec<u8>> {
    match name {
        "cni_invocation" => cni_invocation(),
        "cni_conflist" => cni_conflist(),
        "ipam_frames" => ipam_frames(),
        "checkpoint" => checkpoint(),
        "agent_config" => agent_config(),
        "node_record" => node_record(),
        "plan_topology" => plan_topology(),
        "network_policy" => network_policy(),
        other => panic!("no structured generator for target {other:?}"),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let at = any::<usize>();
    prop_oneof![
        (at, any::<u8>()).prop_map(|(at, bit)| Op::FlipBit { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| Op::SetByte { at, byte }),
        (at, any::<usize>()).prop_map(|(at, token)| Op::InsertToken { at, token }),
        (at, any::<usize>(), any::<usize>()).prop_map(|(at, len, token)| Op::ReplaceWithToken {
            at,
            len,
            token
        }),
        (at, any::<usize>()).prop_map(|(at, len)| Op::Delete { at, len }),
        (at, any::<usize>()).prop_map(|(at, len)| Op::Duplicate { at, len }),
        at.prop_map(|at| Op::Truncate { at }),
        (at, any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(at, other, from, len)| {
            Op::Splice {
                at,
                other,
                from,
                len,
            }
        }),
    ]
}

/// Inputs for a target: raw bytes, a corpus seed (`seeds`) mutated, or a structured document, itself
/// sometimes mutated.
pub fn input(name: &str, seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let raw = vec(any::<u8>(), 0..256).boxed();
    let structured = structured(name);
    let ops = || vec(op(), 0..6);
    let mutated_structured = (structured.clone(), ops())
        .prop_map(|(doc, ops)| mutate::apply(&doc, &ops, &[]))
        .boxed();
    if seeds.is_empty() {
        return prop_oneof![1 => raw, 4 => structured, 2 => mutated_structured].boxed();
    }
    let seeds = std::sync::Arc::new(seeds);
    let pick = seeds.clone();
    let mutated_seed = (any::<prop::sample::Index>(), ops())
        .prop_map(move |(i, ops)| {
            let others: Vec<&[u8]> = pick.iter().map(Vec::as_slice).collect();
            mutate::apply(&pick[i.index(pick.len())], &ops, &others)
        })
        .boxed();
    prop_oneof![1 => raw, 4 => mutated_seed, 3 => structured, 2 => mutated_structured].boxed()
}
