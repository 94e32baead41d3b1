{{/* Full name of the release's objects (at most 63 characters). */}}
{{- define "kvfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kvfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kvfleet.labels" -}}
{{ include "kvfleet.selectorLabels" . }}
app.kubernetes.io/part-of: kvfleet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kvfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvfleet.engineImage" -}}
{{- if .Values.operator.dataplaneImage -}}
{{- .Values.operator.dataplaneImage -}}
{{- else -}}
{{- printf "%s:%s" .Values.engineImage.repository (.Values.engineImage.tag | default .Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "kvfleet.otlpEndpoint" -}}
{{- printf "http://%s-otlp.%s.svc:%d" (include "kvfleet.fullname" .) .Release.Namespace (int .Values.otlp.port) -}}
{{- end -}}

{{/* The namespaced permissions of the operator (used by the ClusterRole or one Role per watched namespace). */}}
{{- define "kvfleet.namespacedRules" }}
- apiGroups: ["kvfleet.io"]
  resources: ["inferencefleets"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvfleet.io"]
  resources: ["modelvariants", "cachepolicies", "sloclasses"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kvfleet.io"]
  resources: ["inferencefleets/status", "modelvariants/status", "cachepolicies/status", "sloclasses/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- /* Held only so the operator may grant it to each fleet's router (RBAC forbids granting what one lacks). */}}
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
