//! The grammar a reply is held to: the kinds of value each place takes, and how deep each
//! one's whole value nests (so that no reply begins a value it cannot finish).

/// Where a node sits in [`Grammar::nodes`].
pub type NodeId = u16;

/// One kind of value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Any JSON value.
    Any,
    Integer,
    Number,
    String,
    /// One of these JSON texts (an enum, a const, `true`/`false`, `null`).
    Texts(Vec<String>),
    Array {
        items: NodeId,
        min: usize,
        max: Option<usize>,
    },
    /// An object with `props` in this order (each key as its JSON text, quotes included);
    /// with none listed, any keys (`free`).
    Object {
        props: Vec<Prop>,
        free: bool,
    },
    /// One of these, told apart by the first character.
    OneOf(Vec<NodeId>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prop {
    pub key: String,
    pub value: NodeId,
    pub required: bool,
}

/// The nodes, the root first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    pub nodes: Vec<Node>,
    /// Per node, the fewest levels of nesting a whole value of it takes, its own included
    /// (at most `MAX_DEPTH + 1`: too deep to write): a value is begun only where it can end.
    pub need: Vec<u8>,
}

/// Deepest nesting a reply may reach (each open object, array, string or number one level).
pub const MAX_DEPTH: usize = 24;

/// Nodes every grammar has, at these places (the root is at 0).
pub const ANY: NodeId = 1;
pub const LITERALS: NodeId = 2;
pub const ANY_OBJECT: NodeId = 3;
pub const ANY_ARRAY: NodeId = 4;

impl Grammar {
    /// Any JSON object.
    pub fn any_object() -> Self {
        Self::of(vec![
            Node::Object {
                props: vec![],
                free: true,
            },
            Node::Any,
            Node::Texts(vec!["true".into(), "false".into(), "null".into()]),
            Node::Object {
                props: vec![],
                free: true,
            },
            Node::Array {
                items: ANY,
                min: 0,
                max: None,
            },
        ])
    }

    pub(super) fn of(nodes: Vec<Node>) -> Self {
        let need = needs(&nodes);
        Self { nodes, need }
    }
}

/// [`Grammar::need`] of each node: found by going over them until nothing changes, as a
/// recursive schema's nodes need one another's.
fn needs(nodes: &[Node]) -> Vec<u8> {
    let cap = MAX_DEPTH as u8 + 1;
    let mut need = vec![cap; nodes.len()];
    let of = |need: &[u8], id: NodeId| need.get(id as usize).copied().unwrap_or(cap);
    loop {
        let mut changed = false;
        for (i, node) in nodes.iter().enumerate() {
            let n = match node {
                Node::Any | Node::Integer | Node::Number | Node::String | Node::Texts(_) => 1,
                Node::Array { items, min, .. } => 1 + if *min > 0 { of(&need, *items) } else { 0 },
                Node::Object { props, .. } => {
                    let required = props.iter().filter(|p| p.required);
                    1 + required.map(|p| of(&need, p.value)).max().unwrap_or(0)
                }
                Node::OneOf(ids) => ids.iter().map(|&id| of(&need, id)).min().unwrap_or(cap),
            };
            if n.min(cap) < need[i] {
                need[i] = n.min(cap);
                changed = true;
            }
        }
        if !changed {
            return need;
        }
    }
}
